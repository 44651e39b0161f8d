"""Thin Prefect flows over dvemb: one file per stage (train, embed, score, curate) plus the pipeline.

Logic lives in ``dvemb``; these modules only orchestrate. Tasks pass run-directory paths (str), never tensors.
"""
