"""vcm: synthetic labelled brain-MRI cohorts from a frozen 3D LDM steered by a Volumetric Conditioning Module."""

__version__ = "0.1.0"
