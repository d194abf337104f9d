"""zorefine's Hydra configs (installed as the package ``zorefine.conf``)."""
