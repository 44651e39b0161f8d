"""dvemb: data value embeddings — which training data helped, which hurt, and when."""

__version__ = "0.1.0"
