"""Exact replay of a recorded run: the optimizer's step map, the replay itself and the exact scorer."""
