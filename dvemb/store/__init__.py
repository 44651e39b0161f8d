"""On-disk stores: Arrow IPC gradient/embedding segments, projection.json, atomic writes."""
