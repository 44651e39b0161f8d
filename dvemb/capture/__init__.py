"""Per-sample projected gradient capture (plain PyTorch hooks + a Lightning callback)."""
