"""`python -m sfseg.gpu_check`: does sfseg work on this GPU node, and how fast? (`__main__`, the command).

`sizes`: what each stage runs, FULL or TINY; `runner`: each stage in its own process under its own time
limit, and the environment stage; `smoke`: the smoke stage; `stages`: the stages that run the project's
commands (a stage's process alone imports these two); `report`: report.md and report.json. The command's
own process imports `runner`, `sizes` and `report` only.
"""
