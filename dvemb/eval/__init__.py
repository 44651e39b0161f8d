"""Ground truth by replaying the recorded trajectory, baselines and fidelity metrics."""
