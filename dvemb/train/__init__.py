"""Lightning training with gradient logging into a run directory."""
