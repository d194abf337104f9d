"""The refine stage: zeroth-order refinement of the selected units, and the baselines it is compared with."""
