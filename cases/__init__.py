"""Scripts that run inside a version cell's virtualenv (torch, transformers, peft, trl installed).

Nothing here is imported by the harness: the harness starts ``python -m cases.run_cell`` as a subprocess and
reads the events and results it writes.
"""
