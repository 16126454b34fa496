"""The trainer's CPU plan: torch threads + data workers never exceed the cores."""
import torch

from sashimi.train import cpu_plan

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_cpu_plan_fits_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores in (1, 2, 4, 8, 16, 64):
        for synthetic in (True, False):
            threads, workers = cpu_plan(CPU, synthetic, None, None, cores=cores, load=0.0)
            assert threads >= 1 and threads + workers <= max(cores, 2), (cores, synthetic, threads, workers)
    assert cpu_plan(CPU, True, None, None, cores=2, load=0.0) == (2, 0)   # synthetic: no workers
    assert cpu_plan(CPU, True, None, None, cores=2, load=6.0) == (1, 0)   # a busy machine: one thread
    assert cpu_plan(CPU, True, None, None, cores=16, load=4.2) == (12, 0)
    assert cpu_plan(CPU, False, None, None, cores=2, load=0.0) == (1, 1)
    assert cpu_plan(CPU, False, None, None, cores=16, load=0.0) == (14, 2)
    assert cpu_plan(CPU, False, None, None, world=4, cores=16, load=0.0) == (3, 1)   # 4 ranks share the cores


def test_flags_and_omp_override(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_plan(CPU, False, 3, 5, cores=2) == (5, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_plan(CPU, True, None, None, cores=8) == (None, 0)      # leave torch's (= OMP) threads
    assert cpu_plan(GPU, False, None, None, cores=8) == (None, 2)
