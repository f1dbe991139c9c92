"""Data preparation: template, demo cohort, input checks, registration, segmentation, conditions."""
