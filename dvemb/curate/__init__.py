"""Curation: filter and reorder training data by value; plans for the next run."""
