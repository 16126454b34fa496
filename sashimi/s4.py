"""The S4 layer: a convolution for training, a recurrence for generation, the same model.

Two parameterisations (`ssm=`):
- "dplr" (S4, the SaShiMi paper's): A = Lambda - P P^* from HiPPO-LegS (N/2 conjugate pairs,
  rank 1), bilinear discretisation. The length-L kernel is evaluated in frequency space with
  one `kernels.cauchy` call on the four Woodbury sums, then `irfft`. C is stored as
  C~ = C (I - A_bar^L), so no matrix power is needed in training.
- "diag" (S4D-Lin or S4D-Inv), ZOH: K = `kernels.vandermonde(C B (exp(dt A) - 1) / A, dt A, L)`.

The layer: y = causal_conv(u, K) + D u, GELU, then Linear(H, 2H) + GLU, per channel H.
`setup_step()` prepares the exact recurrence (`kernels.dplr_step` / `kernels.ssm_step`):
recurrence and convolution are the same function of the input (tests hold them to 1e-4).

Complex parameters are stored as real tensors (..., 2) so every optimiser (fused AdamW
included) handles them; the SSM parameters carry `_optim` hints (lr 1e-3, no weight decay)
that `sashimi.train` turns into parameter groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import reference
from kernels.profiling import nvtx_range

SSM_LR = 1e-3


@dataclass(frozen=True)
class StepFactors:
    """An S4 layer's exact recurrent step (`S4Layer.step_factors()`, after `setup_step()`), in the
    form `kernels.ssm_step` (ssm="diag": dA, dB, C, D) and `kernels.dplr_step` (ssm="dplr": also
    P, Q, W of rank r, (r, H, N)) take: complex64 (H, N) factors, D float32 (H,)."""
    ssm: str
    dA: torch.Tensor
    dB: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    P: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    W: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors as keyword arguments of the step op (dA, dB, C, D[, P, Q, W])."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "ssm" and getattr(self, f.name) is not None}

    def __getitem__(self, name: str):
        """Read-only dict-style access (s["dA"], s["kind"]) for code written against the former
        `S4Layer._step` dict; new code uses the attributes."""
        return self.ssm if name == "kind" else getattr(self, name)

    def same_as(self, other: "StepFactors | None") -> bool:
        """The same factors (setup_step rebuilds them: identity is not enough)."""
        if other is self:
            return True
        if other is None or other.ssm != self.ssm:
            return False
        a, b = self.tensors(), other.tensors()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ssm_param(module: nn.Module, name: str, value: torch.Tensor, lr: float = SSM_LR) -> None:
    """Register an SSM parameter with S4's optimiser hint (smaller lr, no weight decay)."""
    p = nn.Parameter(value)
    p._optim = {"lr": lr, "weight_decay": 0.0}
    module.register_parameter(name, p)


def hippo_legs_dplr(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS in diagonal-plus-low-rank form, one of each conjugate pair.

    A_LegS = S - p p^T with S normal (-1/2 I + skew-symmetric); diagonalising S by a unitary V
    gives Lambda - (V^* p)(V^* p)^*. Returns Lambda, P, B: complex128 (N/2,), computed in
    float64, for a real state of size N (N even).
    """
    if N < 2 or N % 2:
        raise ValueError(f"d_state must be even and >= 2 for the DPLR S4 layer, got {N}")
    n = torch.arange(N, dtype=torch.float64)
    p = torch.sqrt(n + 0.5)                       # the rank-1 factor
    b = torch.sqrt(2 * n + 1)
    A = -torch.sqrt(2 * n[:, None] + 1) * torch.sqrt(2 * n[None, :] + 1)
    A = torch.tril(A, -1) - torch.diag(n + 1)     # A_nk = -(2n+1)^.5 (2k+1)^.5 (n > k), -(n+1) (n = k)
    S = A + p[:, None] * p[None, :]
    lam_real = torch.diagonal(S).mean()           # = -1/2
    lam_imag, V = torch.linalg.eigh(S.to(torch.complex128) * -1j)
    Vh = V.conj().T
    P = Vh @ p.to(torch.complex128)
    B = Vh @ b.to(torch.complex128)
    Lambda = lam_real + 1j * lam_imag
    keep = torch.argsort(lam_imag, descending=True)[: N // 2]  # positive imaginary half
    return Lambda[keep], P[keep], B[keep]


def _as_complex(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(t)


def _real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj()).clone()


def fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u (B, H, L) with K (H, L) through a zero-padded FFT (fp32)."""
    L = u.shape[-1]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)
    return y[..., :L]


class S4Layer(nn.Module):
    """S4 / S4D over (B, L, H) inputs, causal; outputs (B, L, H)."""

    def __init__(self, d_model: int, d_state: int = 64, l_max: int = 16384, ssm: str = "dplr",
                 init: str | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dropout: float = 0.0, kernel_backend: str = "auto"):
        super().__init__()
        if ssm not in ("dplr", "diag"):
            raise ValueError(f"ssm must be 'dplr' or 'diag', got {ssm!r}")
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even number >= 2, got {d_state}")
        self.H, self.N, self.l_max, self.ssm = d_model, d_state // 2, l_max, ssm
        self.init = init or ("legs" if ssm == "dplr" else "lin")
        self.log_dt_range = (math.log(dt_min), math.log(dt_max))
        self.kernel_backend = kernel_backend
        H, N = self.H, self.N

        log_dt = torch.rand(H, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        _ssm_param(self, "log_dt", log_dt.float())
        if ssm == "dplr":
            if self.init != "legs":
                raise ValueError(f"the DPLR layer is initialised from HiPPO-LegS (init='legs'), got {self.init!r}")
            Lambda, P, B = hippo_legs_dplr(d_state)
            Lambda, P, B = (t.expand(H, N) for t in (Lambda, P, B))
            _ssm_param(self, "P", _real_view(P.unsqueeze(0)).float())          # (1, H, N, 2)
        else:
            n = torch.arange(N, dtype=torch.float64)
            if self.init == "lin":
                imag = math.pi * n
            elif self.init == "inv":
                imag = d_state / math.pi * (d_state / (2 * n + 1) - 1)
            else:
                raise ValueError(f"diag init must be 'lin' or 'inv', got {self.init!r}")
            Lambda = (-0.5 + 1j * imag).expand(H, N)
            B = torch.ones(H, N, dtype=torch.complex128)
        _ssm_param(self, "A_real_log", torch.log(-Lambda.real).float().clone())  # Re(Lambda) = -exp(.)
        _ssm_param(self, "A_imag", Lambda.imag.float().clone())
        _ssm_param(self, "B", _real_view(B).float())
        C = torch.randn(H, N, 2) * math.sqrt(0.5)
        self.C = nn.Parameter(C)          # C~ for dplr (C (I - A_bar^l_max)), C for diag
        self.D = nn.Parameter(torch.randn(H))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(H, 2 * H)    # GLU output mix
        self._step = None                 # filled by setup_step()

    # -- parameters ---------------------------------------------------------------------------
    def _dt(self) -> torch.Tensor:
        return torch.exp(self.log_dt.clamp(*self.log_dt_range))

    def _Lambda(self) -> torch.Tensor:
        return torch.complex(-torch.exp(self.A_real_log), self.A_imag)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep log_dt in its range after an optimiser step (no NaN/inf drift)."""
        self.log_dt.clamp_(*self.log_dt_range)

    # -- convolution kernel ---------------------------------------------------------------------
    def kernel(self, L: int | None = None) -> torch.Tensor:
        """The length-L convolution kernel K (H, L), fp32. DPLR kernels are exact for L = l_max."""
        L = self.l_max if L is None else L
        with torch.autocast(device_type=self.C.device.type, enabled=False):
            dt = self._dt()
            Lam = self._Lambda()
            B = _as_complex(self.B)
            C = _as_complex(self.C)
            if self.ssm == "diag":
                dtA = dt[:, None] * Lam
                v = C * B * (torch.exp(dtA) - 1) / Lam
                return kernels.vandermonde(v, dtA, L, backend=self.kernel_backend)
            return self._dplr_kernel(L, dt, Lam, B, C)

    def _dplr_kernel(self, L, dt, Lam, B, C):
        P = _as_complex(self.P)[0]                                          # (H, N), rank 1
        # rfft nodes Omega_k = exp(-2 pi i k / L), k = 0..L/2, through the bilinear map
        k = torch.arange(L // 2 + 1, device=dt.device)
        omega = torch.polar(torch.ones_like(k, dtype=torch.float32), -2 * math.pi * k / L)
        nyquist = L % 2 == 0                     # Omega = -1 maps to z = inf: its value is analytic
        om = omega[:-1] if nyquist else omega
        z = 2 * (1 - om) / (1 + om)
        # the four Woodbury sums (C~ B, C~ P, P^* B, P^* P) in one call, w = dt Lambda shared
        Pc = P.conj()
        v = torch.stack([C * B, C * P, Pc * B, Pc * P])                      # (4, H, N)
        r = kernels.cauchy(v, z, dt[:, None] * Lam, backend=self.kernel_backend) * dt[:, None]
        k_hat = r[0] - r[1] * r[2] / (1 + r[3])
        k_hat = k_hat * (2 / (1 + om))
        if nyquist:  # lim_{Omega -> -1} of the above: dt Re(sum_n C~ B) (the pair sum / 2 * dt)
            k_ny = dt * (C * B).sum(-1).real
            k_hat = torch.cat([k_hat, k_ny.to(k_hat.dtype)[:, None]], dim=-1)
        return torch.fft.irfft(k_hat, n=L)

    # -- training (convolution) ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, H) with L <= l_max -> (B, L, H)."""
        L = x.shape[1]
        if L > self.l_max:
            raise ValueError(f"sequence length {L} exceeds the layer's l_max {self.l_max}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = x.transpose(1, 2).float()                                  # (B, H, L)
            with nvtx_range("sashimi/s4/kernel"):
                # DPLR's C~ makes the kernel exact at l_max only: compute it there and truncate
                K = self.kernel(self.l_max)[:, :L] if self.ssm == "dplr" else self.kernel(L)
            with nvtx_range("sashimi/s4/fftconv"):
                y = fft_conv(u, K) + self.D[:, None] * u
            y = F.gelu(y).transpose(1, 2)
        return F.glu(self.out(self.dropout(y)), dim=-1)

    # -- generation (recurrence) --------------------------------------------------------------
    @torch.no_grad()
    def setup_step(self) -> None:
        """Precompute the exact recurrent step once (call again after the weights change)."""
        dt = self._dt().double()
        Lam = self._Lambda().to(torch.complex128)
        B = _as_complex(self.B).to(torch.complex128)
        C = _as_complex(self.C).to(torch.complex128)
        if self.ssm == "diag":
            f = dict(reference.diag_step_factors(dt[:, None], Lam, B), C=C)
        else:
            P = _as_complex(self.P).to(torch.complex128)                   # (1, H, N), Q = P
            f = dict(reference.dplr_step_factors(dt[:, None], Lam, B, P),
                     C=self._undo_c_tilde(C, dt, Lam, P))
        f = {k: v.to(torch.complex64).contiguous() for k, v in f.items()}
        self._step = StepFactors(self.ssm, D=self.D.detach().float().contiguous(), **f)

    def step_factors(self) -> StepFactors | None:
        """The exact recurrent step prepared by `setup_step()` (None before it)."""
        return self._step

    def _undo_c_tilde(self, C_tilde, dt, Lam, P):
        """C = C~ (I - A_bar^L)^-1 on the full 2N state (dense, at setup only)."""
        H, N = C_tilde.shape
        eye = torch.eye(2 * N, dtype=torch.complex128, device=C_tilde.device)
        lam_full = torch.cat([Lam, Lam.conj()], -1)                        # (H, 2N)
        p_full = torch.cat([P[0], P[0].conj()], -1)                        # (H, 2N)
        A = torch.diag_embed(lam_full) - p_full[:, :, None] * p_full.conj()[:, None, :]
        two_dt = (2 / dt)[:, None, None]
        A_bar = torch.linalg.solve(two_dt * eye - A, two_dt * eye + A)
        A_bar_L = torch.linalg.matrix_power(A_bar, self.l_max)
        c_full = torch.cat([C_tilde, C_tilde.conj()], -1)                  # (H, 2N) row vectors
        # C (I - A_bar^L) = C~  <=>  (I - A_bar^L)^T C^T = C~^T
        c = torch.linalg.solve((eye - A_bar_L).transpose(-1, -2), c_full.unsqueeze(-1)).squeeze(-1)
        return c[:, :N]

    def default_state(self, batch: int, device=None) -> torch.Tensor:
        device = self.C.device if device is None else device
        return torch.zeros(batch, self.H, self.N, dtype=torch.complex64, device=device)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """x: (B, H) one time step -> (B, H); `state` is updated in place."""
        if self._step is None:
            raise RuntimeError("call setup_step() before step()")
        op = kernels.ssm_step if self._step.ssm == "diag" else kernels.dplr_step
        y = op(state, x.float(), **self._step.tensors(), backend=self.kernel_backend)
        return F.glu(self.out(F.gelu(y)), dim=-1)
