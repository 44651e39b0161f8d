"""Thin Prefect flows over dvemb: one file per stage (train, embed, score, curate), the pipeline that runs
their tasks as one flow run (and publishes the curated dataset), and the retraining on a published version.

Logic lives in ``dvemb``; these modules only orchestrate. Tasks pass run-directory paths (str), never tensors.
Deployments: ``prefect.yaml`` (work pool + workers) or ``deployments/serve.py`` (one process); docs/PREFECT.md.
"""
