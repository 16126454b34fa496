"""`python -m bench.gpu_check`: the whole GPU picture from one device call (<= 8 minutes).

    python -m bench.gpu_check [--out DIR] [--dry-run] [--budget S] [--stages a,b] [--triton-cache DIR]
    python -m bench.gpu_check.wheels          # here, once: the wheels the GPU machine lacks -> wheels/

Stages, in order, each in its own process with its own time box (seconds on the GPU; a stage
that runs past its box is killed and the next one starts), results written as they come:

  setup       install wheels/ (pip --target, no network)                                      60
  precompile  scripts/aot_check.py --cache-dir: every kernel x autotune config compiled for
              sm_90 on all cores into the session's Triton cache                               60
  facts       device, versions, packages, copy / fp32 matmul ceilings, the self-test           75
  headline    cauchy and vandermonde fwd and fwd+bwd (B=1024, N/2=32, L=16384, Triton and the
              reference); the paper preset's training step, mono and stereo, fp32 and bf16,
              eager then torch.compile; generation at batch 1 and 256, CUDA graphs and eager;
              recurrence vs convolution at the paper size, 512 steps                           220
  tests       pytest -m "gpu or interpreter" tests --device cuda, the gpu-marked tests first   120
  profile     profiles/torch_profile.py: one training step and one generation step             45
  bench       the rest of `pytest bench --benchmark-only`, file by file, while time is left   rest

Output (at most 8 files come back from the device): gpu_check.json (everything, rewritten after
every figure), summary.txt (its short text), bench.json (pytest-benchmark JSON of every timing,
for `python -m bench.report` and `python -m bench.compare`), profile.txt, log.txt.

Exit status 0 when every stage that ran was ok. `--dry-run` is the CPU rehearsal that CI runs
(scripts/test.sh): the same stages and code, Triton under TRITON_INTERPRET=1, tiny sizes, every
result field written; what needs a GPU (CUDA graphs, Inductor) is replaced by its eager CPU twin
and says so in the figure's label. On the GPU, TRITON_CACHE_AUTOTUNING=1 and
TRITON_PRINT_AUTOTUNING=1; each stage records `triton_new_cubins` (its cache misses after the
precompile stage), each figure its `first_call_s`, gpu_check.json's `autotune` every autotuned
kernel's choices. What compiling costs: docs/kernels.md.
"""
