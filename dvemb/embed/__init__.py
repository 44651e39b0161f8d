"""Data value embeddings: the backward recursion (Algorithm 1), segments (Algorithm 2), direct scoring."""
