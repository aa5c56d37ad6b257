"""`python -m sfseg.gpu_check`: does sfseg work on this GPU node, and how fast? (`__main__`, the command).

`sizes`: what each stage runs, FULL or TINY; `runner`: each stage in its own process under its own time
limit; `stages`: the stages after the environment (a stage's process alone imports it); `report`:
report.md and report.json. The command's own process imports `runner`, `sizes` and `report` only.
"""
