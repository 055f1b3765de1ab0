"""lmms-eval task files of the aim plugin (``--include_path`` this folder or a make_data OUTDIR)."""
