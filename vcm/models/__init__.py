"""Networks: the Volumetric Conditioning Module (:mod:`vcm.models.vcm`) and the frozen backbone
(:mod:`vcm.models.backbone`). Import the submodules directly; this package imports nothing heavy."""
