"""The version-matrix harness: matrix data, the cell runner, results files, verdict rules, report and gate.

Standard library only, except the report (pandas + tabulate), so it runs in nox's own interpreter; the cases
it supervises run inside each cell's virtualenv (see cases/).
"""
