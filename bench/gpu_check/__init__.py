"""`python -m bench.gpu_check`: the whole GPU picture from one device call (<= 8 minutes).

    python -m bench.gpu_check [--out DIR] [--dry-run] [--budget S] [--stages a,b] [--triton-cache DIR]
    python -m bench.gpu_check.wheels          # here, once: the wheels the GPU machine lacks -> wheels/

Stages, in order, each in its own process with its own time box (seconds on the GPU; a stage
that runs past its box is killed and the next one starts), results written as they come:

  setup     install wheels/ (pip --target, no network)                                    60
  precompile  scripts/aot_check.py --cache-dir: every kernel x autotune config compiled for
            sm_90 on all cores into the session's Triton cache (autotuning at run time
            compiles one config at a time); what is not done at the box's end compiles
            on first use as before                                                          60
  facts     device (name, SMs, memory, clocks via nvidia-smi), versions, the packages the
            session needs, copy / fp32 matmul ceilings, `python -m kernels.selftest`      75
  headline  medians with p20-p80 spread: cauchy and vandermonde fwd and fwd+bwd at
            B=1024, N/2=32, L=16384, Triton and the reference; the paper preset's training
            step, mono B=8 x 16384 and stereo B=4 x 16384 x 2, fp32 and bf16, eager then
            torch.compile (tokens/s, peak memory, first-call compile/autotune seconds);
            generation steps/s at batch 1 and 256, CUDA graphs and eager, mono and stereo;
            recurrence vs convolution relative error at the paper size, 512 steps      220
  tests     pytest -m "gpu or interpreter" tests --device cuda, hypothesis profile interp,
            the gpu-marked tests first                                                    120
  profile   profiles/torch_profile.py: one training step and one generation step         45
  bench     the rest of `pytest bench --benchmark-only`, file by file, while time is left
            (the headline's own benchmarks are deselected, not measured twice)          rest

Output (at most 8 files come back from the device's $OUT; these are 5):
  gpu_check.json  everything, machine-readable; rewritten after every figure and stage
  summary.txt     the short text version of it
  bench.json      pytest-benchmark JSON of every timing (headline + the rest of bench/), for
                  `python -m bench.report` (BENCHMARKS.md) and `python -m bench.compare`
  profile.txt     the torch.profiler tables
  log.txt         every stage's output

Exit status 0 when every stage that ran was ok. `--dry-run` is the CPU rehearsal that CI runs
(scripts/test.sh): the same stages and code, Triton under TRITON_INTERPRET=1, tiny sizes, every
result field written; what needs a GPU (CUDA graphs, Inductor) is replaced by its eager CPU twin
and says so in the figure's label.

Compile and autotune: on the GPU, TRITON_CACHE_AUTOTUNING=1 (each kernel is tuned once in the
session; later stages reuse it from the cache dir) and TRITON_PRINT_AUTOTUNING=1 (the configs
chosen and tuning time, in log.txt); gpu_check.json's `autotune` lists every autotuned kernel's
configs and choices, each stage records `triton_new_cubins` (the kernels it compiled: after
the precompile stage, each one is a cache miss of the runtime), each timed figure its
`first_call_s` (compile + autotune + first run).

What compiling costs (sm_90, every config of every kernel at the compile check's paper / anchor
sizes, one compile at a time, measured 2026-12-02 on the 2-core CI-class machine while three
other jobs ran (load 5-8), so an upper bound; an autotuned kernel's first call at a new
specialisation compiles every config of its list):

    kernel                           configs  compiles  mean s  max s  total s
    _cauchy_fwd_kernel                    14        28     1.3    3.4       36
    _cauchy_bwd_kernel                    10        10     2.1    8.2       21
    _vandermonde_fwd_kernel                5        20     8.2   25.4      164
    _vandermonde_bwd_kernel                5        20     8.8   25.1      176
    _vandermonde_bwd_reduce_kernel         1         2     2.0    3.6        4
    _embed_interleave_* (6 kernels)       21       124     1.2    5.0      146
    _ssm_step_fwd_kernel                  13        13     0.7    1.1        9
    _dplr_step_fwd_kernel                 13        26     1.1    2.1       30
    _tier_step_fwd_kernel                 10       130     6.6   72.7      854
    all                                            373                   1439

So the headline kernels alone would spend ~40 s (cauchy) + ~85 s (vandermonde) of ptxas on one
core before their first timing, and the paper model's tier_step ~65 s per tier width: hence the
precompile stage on all 16 cores, the self-test held to first configs, and the per-stage cubin
counts. The `autotune` section (configs chosen per key) is what a committed pre-tuned table, or
autotune lists pruned to the configs that win at these sizes, would be built from after a run.
"""
