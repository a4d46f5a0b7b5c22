"""trillora's Hydra launcher: a ``--multirun`` as one sweep on one set of fleets (``launcher``)."""
