"""Thin Prefect tasks: each calls one library function (``evomerge``) and holds no logic."""
