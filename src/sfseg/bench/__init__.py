"""`python -m sfseg.bench` (`__main__`, the command): what the pyramid costs next to the single output.

`harness`: the sizes, inputs, interleaved medians and counts every section shares; `variants`: the
models compared and one inference or training step of each; `pyramid_math`: targets and fuse against
their plain baselines; `table5`: Table 5; `memory`: peak memory (CPU: in fresh processes); `backbones`:
the Backbones table; `profiling`: torch.profiler's tables; `results`: one run's sections and results.md.
"""
