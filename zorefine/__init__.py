"""zorefine: zeroth-order refinement that makes safety alignment robust to perturbations."""

__version__ = "0.1.0"
