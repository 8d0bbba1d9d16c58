"""The question-aware selector's per-token work as compiled C: ``qa_push`` runs one chain token through every block
against the chain's memory (step-state embedding, the attention bias of the ring and the result slots, every block,
the final layer norm) and ``qa_log_probs`` scores the table candidates and the copy values (one softmax).

NumPy pays 1–4 µs of call overhead per operation and one token through a 2 × 128 selector is ~60 small operations
for little arithmetic; here a token costs two calls. The C source is below; it is compiled once per machine with the
system's C compiler (``-march=native``) into a user cache folder, keyed by source, flags, compiler version, CPU
model and CPU feature flags (a cache shared between hosts never loads code built for another CPU; nothing is
downloaded, nothing is added to the install), and loaded with ctypes, which releases the GIL during a call. Without
a compiler, or with ``OVERLAY_KERNEL=0``, ``load()`` returns None and ``QAScorer`` runs its NumPy path, which gives
the same scores (tests/selector/test_qa_kernel.py). The weights a step streams sit in one buffer on huge pages
(``pack``), shared by both paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ENV = "OVERLAY_KERNEL"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared", "-std=c99")
PORTABLE = ("-O3", "-fPIC", "-shared", "-std=c99")  # for compilers that refuse one of FLAGS

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* y = x @ W + b, W row-major [din, dout] (the NumPy copy's layout). */
static void matvec(const float *x, const float *W, const float *b, int din, int dout, float *y) {
    memcpy(y, b, sizeof(float) * dout);
    for (int i = 0; i < din; i++) {
        const float xi = x[i];
        const float *row = W + (int64_t)i * dout;
        #pragma omp simd
        for (int j = 0; j < dout; j++) y[j] += xi * row[j];
    }
}

/* Layer norm without scale and shift (folded into the following matrix). */
static void whiten(const float *x, int d, float eps, float *y) {
    const float inv = 1.0f / (float)d;
    float mean = 0.0f, var = 0.0f;
    #pragma omp simd reduction(+:mean)
    for (int i = 0; i < d; i++) mean += x[i] * inv;
    for (int i = 0; i < d; i++) y[i] = x[i] - mean;
    #pragma omp simd reduction(+:var)
    for (int i = 0; i < d; i++) var += y[i] * y[i] * inv;
    const float s = sqrtf(var + eps);
    for (int i = 0; i < d; i++) y[i] /= s;
}

/* dims: n_layer, d, h, hd, m (memory rows), nq (question rows), span, R (result rows), ff (MLP width).
   w: wte, tag, step, res, slopes, ln_f weight, ln_f bias, then per layer attn_w, attn_b, proj_w, proj_b,
   fc_w, fc_b, out_w, out_b. eps: per layer eps1, eps2; then ln_f's eps, the attention scale. */
void qa_push(const int64_t *dims, const float *const *w, const float *eps, float *keys, float *values, float *bias,
             const int64_t *pin_pos, float *out, int64_t token, int64_t tag, int64_t step, int64_t res, int64_t p,
             int64_t pin_row) {
    const int n_layer = dims[0], d = dims[1], h = dims[2], hd = dims[3], m = dims[4], nq = dims[5],
              span = dims[6], R = dims[7], ff = dims[8];
    const float *slopes = w[4];
    float x[d], t[d], qkv[3 * d], att[d], hid[ff], o[d], s[m];
    for (int i = 0; i < d; i++)
        x[i] = w[0][token * d + i] + w[1][tag * d + i] + w[2][step * d + i] + w[3][res * d + i];
    const int slot = p % span;
    for (int hh = 0; hh < h; hh++) {
        float *row = bias + (int64_t)hh * m;
        for (int j = 0; j < span; j++)
            row[nq + j] = (p + 1 >= span || j <= p) ? -(slopes[hh] * (float)((slot - j + span) % span)) : -INFINITY;
        const float pin = -(slopes[hh] * (float)span);
        for (int r = 0; r < R; r++)
            row[nq + span + r] = (pin_pos[r] >= 0 && pin_pos[r] <= p - span) ? pin : -INFINITY;
    }
    for (int l = 0; l < n_layer; l++) {
        const float *const *lw = w + 7 + 8 * l;
        float *K = keys + (int64_t)l * h * m * hd, *V = values + (int64_t)l * h * m * hd;
        whiten(x, d, eps[2 * l], t);
        matvec(t, lw[0], lw[1], d, 3 * d, qkv);
        for (int hh = 0; hh < h; hh++) {
            const float *q = qkv + hh * hd;
            float *Kh = K + (int64_t)hh * m * hd, *Vh = V + (int64_t)hh * m * hd;
            const float *brow = bias + (int64_t)hh * m;
            memcpy(Kh + (int64_t)(nq + slot) * hd, qkv + d + hh * hd, sizeof(float) * hd);
            memcpy(Vh + (int64_t)(nq + slot) * hd, qkv + 2 * d + hh * hd, sizeof(float) * hd);
            if (pin_row >= 0) {
                memcpy(Kh + pin_row * hd, qkv + d + hh * hd, sizeof(float) * hd);
                memcpy(Vh + pin_row * hd, qkv + 2 * d + hh * hd, sizeof(float) * hd);
            }
            float top = -INFINITY;
            for (int k = 0; k < m; k++) {
                if (brow[k] == -INFINITY) { s[k] = -INFINITY; continue; }
                const float *kr = Kh + (int64_t)k * hd;
                float dot = 0.0f;
                #pragma omp simd reduction(+:dot)
                for (int e = 0; e < hd; e++) dot += q[e] * kr[e];
                s[k] = dot * eps[2 * n_layer + 1] + brow[k];
                if (s[k] > top) top = s[k];
            }
            float total = 0.0f;
            for (int k = 0; k < m; k++) { s[k] = s[k] == -INFINITY ? 0.0f : expf(s[k] - top); total += s[k]; }
            float *a = att + hh * hd;
            for (int e = 0; e < hd; e++) a[e] = 0.0f;
            for (int k = 0; k < m; k++) {
                if (s[k] == 0.0f) continue;
                const float pk = s[k] / total;
                const float *vr = Vh + (int64_t)k * hd;
                #pragma omp simd
                for (int e = 0; e < hd; e++) a[e] += pk * vr[e];
            }
        }
        matvec(att, lw[2], lw[3], d, d, o);
        for (int i = 0; i < d; i++) x[i] += o[i];
        whiten(x, d, eps[2 * l + 1], t);
        matvec(t, lw[4], lw[5], d, ff, hid);
        for (int i = 0; i < ff; i++) hid[i] = hid[i] * (erff(hid[i] * 0.70710678118654752f) + 1.0f) * 0.5f;
        matvec(hid, lw[6], lw[7], ff, d, o);
        for (int i = 0; i < d; i++) x[i] += o[i];
    }
    whiten(x, d, eps[2 * n_layer], t);
    for (int i = 0; i < d; i++) out[i] = t[i] * w[5][i] + w[6][i];
}

static float dot(const float *a, const float *b, int d) {
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

/* Log-probabilities over n token candidates (wte rows dotted with the final hidden state) and n_groups copy
   values: occurrence j scores key_j . (final @ ptr_q) * ptr_scale, and belongs to value group[j] (-1: not
   visible); a value's logit is the log-sum-exp of its occurrences'. One softmax over all n + n_groups. */
void qa_log_probs(const int64_t *dims, const float *const *w, const float *eps, const float *final,
                  const int64_t *cands, int64_t n, const float *keys, const int64_t *group, int64_t n_occ,
                  int64_t n_groups, float *out) {
    const int n_layer = dims[0], d = dims[1];
    const float *wte = w[0], *ptr_q = w[7 + 8 * n_layer];
    float top = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        out[i] = dot(wte + cands[i] * d, final, d);
        if (out[i] > top) top = out[i];
    }
    if (n_groups) {
        float q[d], s[n_occ];
        for (int i = 0; i < d; i++) q[i] = 0.0f;
        for (int i = 0; i < d; i++) {
            const float fi = final[i];
            const float *row = ptr_q + (int64_t)i * d;
            #pragma omp simd
            for (int j = 0; j < d; j++) q[j] += fi * row[j];
        }
        for (int64_t j = 0; j < n_occ; j++) s[j] = group[j] < 0 ? 0.0f : dot(keys + j * d, q, d) * eps[2 * n_layer + 2];
        for (int64_t g = 0; g < n_groups; g++) {
            float m = -INFINITY, sum = 0.0f;
            for (int64_t j = 0; j < n_occ; j++) if (group[j] == g && s[j] > m) m = s[j];
            for (int64_t j = 0; j < n_occ; j++) if (group[j] == g) sum += expf(s[j] - m);
            out[n + g] = m + logf(sum);
            if (out[n + g] > top) top = out[n + g];
        }
    }
    float total = 0.0f;
    for (int64_t i = 0; i < n + n_groups; i++) total += expf(out[i] - top);
    const float lse = top + logf(total);
    for (int64_t i = 0; i < n + n_groups; i++) out[i] -= lse;
}
"""

HUGE_PAGE = 2 << 20
log = logging.getLogger(__name__)
_P = ctypes.c_void_p
_L = ctypes.c_int64


def pack(arrays: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Float32 copies of ``arrays``, one after another (64-byte aligned) in one buffer that starts on a 2 MiB boundary
    and spans at least 4 MiB, so NumPy asks the OS for transparent huge pages: the weights a step streams every
    token then cost few TLB misses. Returns the buffer (keep it alive) and the copies, views into it."""
    sizes = [(a.nbytes + 63) // 64 * 64 for a in arrays]
    raw = np.zeros(max(sum(sizes) + HUGE_PAGE, 3 * HUGE_PAGE), np.uint8)
    offset = -raw.ctypes.data % HUGE_PAGE
    views = []
    for a, size in zip(arrays, sizes):
        view = raw[offset:offset + a.nbytes].view(np.float32).reshape(a.shape)
        view[...] = a
        views.append(view)
        offset += size
    return raw, views


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$XDG_CACHE_HOME`` (or ~/.cache) / langflow-overlay / kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "langflow-overlay" / "kernels"


def _cpu() -> str:
    """The CPU model and its feature flags (``-march=native`` code runs only on a CPU with the features it was built
    for: one model name can come with different flags, e.g. under a hypervisor)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def _compiler_version(cc: str) -> str:
    """The compiler's own version text (another version may emit other instructions for ``-march=native``)."""
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cache_key(cc: str) -> str:
    """The compiled kernel's cache key: source, compiler and its version, flags, machine, CPU model and features."""
    parts = [SOURCE, cc, _compiler_version(cc), *FLAGS, platform.machine(), _cpu()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _compiler() -> str | None:
    """The C compiler to build with: $CC, else cc or gcc on PATH."""
    return next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library (built on first use, then reused from the cache folder), or None when it is
    switched off (``OVERLAY_KERNEL=0``) or cannot be built here; ``reason()`` says why."""
    global _why
    if os.environ.get(ENV, "1") == "0":
        _why = f"switched off by {ENV}=0"
        return None
    cc = _compiler()
    if cc is None:
        _why = "no C compiler (cc, gcc or $CC) on PATH"
        log.warning("question-aware selector: NumPy step (slower), %s", _why)
        return None
    target = cache_dir() / f"qa_kernel-{cache_key(cc)}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, lib = Path(tmp) / "qa_kernel.c", Path(tmp) / target.name
                src.write_text(SOURCE)
                try:
                    subprocess.run([cc, *FLAGS, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True,
                                   timeout=120)
                except subprocess.CalledProcessError:
                    subprocess.run([cc, *PORTABLE, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True,
                                   timeout=120)
                lib.replace(target)  # atomic: a concurrent build never loads half a file
        dll = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        _why = f"building the kernel failed: {exc} {detail.decode(errors='replace')[:300]}".strip()
        log.warning("question-aware selector: NumPy step (slower), %s", _why)
        return None
    dll.qa_push.argtypes = [_P] * 8 + [_L] * 6
    dll.qa_push.restype = None
    dll.qa_log_probs.argtypes = [_P] * 5 + [_L, _P, _P, _L, _L, _P]
    dll.qa_log_probs.restype = None
    _why = ""
    log.info("question-aware selector: compiled C step (%s)", target)
    return dll


_why = ""


def reason() -> str:
    """Why ``load()`` returned None ("" when the kernel is in use)."""
    load()
    return _why


class Kernel:
    """One QAScorer's weights laid out for ``qa_push`` (pointers into arrays this object keeps alive)."""

    def __init__(self, dll: ctypes.CDLL, scorer) -> None:
        arrays = [scorer.wte, scorer.tag, scorer.step, scorer.res, scorer.slopes, scorer.ln_f[0], scorer.ln_f[1]]
        eps = []
        for (attn_w, attn_b, eps1), proj_w, proj_b, (fc_w, fc_b, eps2), out_w, out_b in scorer.blocks:
            arrays += [attn_w, attn_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b]
            eps += [eps1, eps2]
        self.arrays = [np.ascontiguousarray(a, np.float32) for a in arrays + [scorer.ptr_q]]
        self.weights = (ctypes.c_void_p * len(self.arrays))(*(a.ctypes.data for a in self.arrays))
        self.eps = np.asarray(eps + [scorer.ln_f[2], float(scorer.scale), float(scorer.ptr_scale)], np.float32)
        self.ff = scorer.blocks[0][3][0].shape[1]
        self.sizes = (len(scorer.wte), len(scorer.tag), len(scorer.step), len(scorer.res))  # what push may index
        self.fn, self.log_probs_fn = dll.qa_push, dll.qa_log_probs
        self.scorer = scorer

    def dims(self, n_question: int, rows: int) -> np.ndarray:
        """The shape vector ``qa_push`` reads for a memory of ``rows`` rows over ``n_question`` question tokens."""
        s = self.scorer
        return np.asarray([s.n_layer, s.d, s.n_head, s.hd, rows, n_question, s.span, s.result_tokens, self.ff], np.int64)

    def bind(self, mem) -> Bound:
        """The call's view of one chain's memory (allocating its final hidden state)."""
        return Bound(self, mem)

    def push(self, bound: Bound, token: int, tag: int, step: int, res: int, p: int, pin_row: int) -> None:
        """One token through every block: writes its keys/values and the bias into the memory, the final hidden
        state into the memory's ``last``. Ids outside the model's tables raise IndexError (C would read past them)."""
        vocab, tags, steps, results = self.sizes
        if not (0 <= token < vocab and 0 <= tag < tags and 0 <= step < steps and 0 <= res < results):
            raise IndexError(f"token {token}, tag {tag}, step {step} or result {res} is outside the model's tables "
                             f"({vocab} tokens, {tags} tags, {steps} steps, {results} results)")
        self.fn(*bound.ptrs, token, tag, step, res, p, pin_row)

    def log_probs(self, bound: Bound, candidates: list[int], plan) -> np.ndarray:
        """Log-probabilities over the candidates then the plan's copy values, from the memory's final hidden state
        (``plan``: ``QAScorer._copy_plan``, the occurrences' keys and value index with their addresses). A candidate
        id outside the vocabulary raises IndexError, as the NumPy path does, and arrays of another dtype or layout
        raise TypeError: the C code reads exactly what it is given."""
        n, total = len(candidates), len(candidates) + len(plan.copies)
        if n and not (0 <= min(candidates) and max(candidates) < self.sizes[0]):
            bad = next(c for c in candidates if not 0 <= c < self.sizes[0])
            raise IndexError(f"candidate id {bad} is outside the vocabulary of {self.sizes[0]} tokens")
        if plan.groups.dtype != np.int64 or (plan.keys is not None and plan.keys.dtype != np.float32) or not (
                plan.groups.flags.c_contiguous and (plan.keys is None or plan.keys.flags.c_contiguous)):
            raise TypeError("the copy plan's keys must be C-contiguous float32 and its groups int64")
        if total > len(bound.out):
            bound.grow(total)
        bound.cands[:n] = candidates
        ptrs = bound.ptrs
        self.log_probs_fn(ptrs[0], ptrs[1], ptrs[2], ptrs[7], bound.cands_at, n, plan.keys_at, plan.groups_at,
                          len(plan.groups), len(plan.copies), bound.out_at)
        return bound.out[:total].copy()


class Bound:
    """One chain's memory as ``qa_push`` sees it: the shape vector, the addresses of the memory's arrays and of its
    final hidden state (allocated here), and scratch for scoring; arrays never move once allocated, and this object
    keeps them alive."""

    def __init__(self, kernel: Kernel, mem) -> None:
        self.dims = kernel.dims(mem.n_question, mem.keys.shape[2])
        mem.last = np.zeros(kernel.scorer.d, np.float32)
        self.arrays = (self.dims, mem.keys, mem.values, mem.bias, mem.pin_pos, mem.last)
        if not all(a.flags.c_contiguous for a in self.arrays):
            raise ValueError("the chain memory's arrays must be C-contiguous")
        if [a.dtype for a in self.arrays] != [np.int64, np.float32, np.float32, np.float32, np.int64, np.float32]:
            raise TypeError("the chain memory's keys, values, bias must be float32 and its pin positions int64")
        self.ptrs = (self.dims.ctypes.data, ctypes.addressof(kernel.weights), kernel.eps.ctypes.data,
                     mem.keys.ctypes.data, mem.values.ctypes.data, mem.bias.ctypes.data, mem.pin_pos.ctypes.data,
                     mem.last.ctypes.data)
        self.grow(128)

    def grow(self, size: int) -> None:
        """Scratch for at least ``size`` scores (candidates and copy values)."""
        self.cands, self.out = np.zeros(size, np.int64), np.zeros(size, np.float32)
        self.cands_at, self.out_at = self.cands.ctypes.data, self.out.ctypes.data
