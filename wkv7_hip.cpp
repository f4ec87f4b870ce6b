// wkv7_hip.cpp: the RWKV-7 WKV recurrence for ROCm, the same algorithm as wkv7.cu (read its header first).
//
// What differs from wkv7.cu: chunks of L = 8 steps (so that the backward's shared memory fits the 64 KB of LDS of
// CDNA / RDNA), the matrix products are plain fp32 loops (one output element per thread, no tensor cores, no
// warp or wavefront primitives, so 32- and 64-wide wavefronts behave the same), bf16 is handled by its bits, and
// the backward keeps 16 state rows per block (heads split in four; key-side gradients summed with fp32 atomics).
// Same ops and schemas as wkv7.cu (namespace wkv7_nN), registered for the CUDA dispatch key that ROCm torch uses.
//
// Build: model.py copies this file to wkv7_hip.hip in the extension's build folder (torch's cpp_extension sends
// only .cu/.cuh/.hip files to the device compiler) and loads it with -D_N_=64 -DWKV7_NS=wkv7_n64 -O3 -ffast-math.
// Device code alone, for CI without an AMD GPU: .ci/hip_check.sh (hipcc -DWKV7_NO_TORCH --offload-arch=gfx90a /
// gfx1100 -c). Not yet run on AMD hardware (pytest -m gpu tests/test_wkv7_gpu.py on a ROCm machine); its logic is
// checked on the CPU by tests/test_wkv7_emu.py.

#ifndef WKV7_EMU
#include <hip/hip_runtime.h>
#endif
#include <type_traits>

#ifndef _N_
#define _N_ 64
#endif
#ifndef _L_
#define _L_ 8
#endif

namespace wkv7 {
struct bf16 { unsigned short bits; };  // bf16 by its bits: no dependence on the ROCm version's bf16 header
__device__ __forceinline__ float __bfloat162float(bf16 x) { return __uint_as_float((unsigned)x.bits << 16); }
__device__ __forceinline__ bf16 __float2bfloat16_rn(float f) {  // round to nearest even (NaN stays NaN)
  const unsigned u = __float_as_uint(f);
  return bf16{(unsigned short)(f != f ? 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
constexpr int N = _N_, L = _L_, NT = 256, NT_BWD = 256;  // threads per block (any multiple of 64 or 32 works)
[[maybe_unused]] constexpr int LB = L;  // the spacing of the saved states (ckpt): one chunk, forward and backward alike
constexpr int LDN = N + 4, LD2 = 2 * L + 4, LDL = L + 4;  // padded row lengths of shared-memory tiles
constexpr float LOG_DECAY_SCALE = -0.6065306597126334f;    // lambda = LOG_DECAY_SCALE * sigmoid(w)
static_assert(N % 16 == 0 && N <= NT && L * N % NT_BWD == 0 && L * N % NT == 0, "head size");

struct Args {
  const bf16 *r, *w, *k, *v, *a, *b;  // (B, T, H, N)
  int T, H;
};
__device__ __forceinline__ size_t idx(const Args& p, int bb, int t, int h) { return (((size_t)bb * p.T + t) * p.H + h) * N; }

struct __align__(8) bf16x4 { bf16 x[4]; };
__device__ __forceinline__ void ld4(const bf16* p, float* o) {
  bf16x4 u = *reinterpret_cast<const bf16x4*>(p);
  for (int q = 0; q < 4; q++) o[q] = __bfloat162float(u.x[q]);
}
__device__ __forceinline__ void st4(bf16* p, const float* o) {
  bf16x4 u;
  for (int q = 0; q < 4; q++) u.x[q] = __float2bfloat16_rn(o[q]);
  *reinterpret_cast<bf16x4*>(p) = u;
}

// C (= or +=) op(A) op(B), fp32 in shared memory, op(X) = X or X^T, one output element per thread at a time (no
// warp or wavefront primitives). CAUSAL: the 2L x 2L chunk masks (entries outside are written as 0).
template <int NW, bool TA, bool TB, int PASSES, bool CAUSAL, int M, int Nn, int K, int lda, int ldb, int ldc>
__device__ void mm(float* C, const float* A, const float* B, bool acc) {
  for (int e = threadIdx.x; e < M * Nn; e += NW * 32) {
    const int m = e / Nn, n = e % Nn;
    float sum = acc ? C[m * ldc + n] : 0.f;
    if (!CAUSAL || n % L <= m % L - (m >= L))
      for (int k = 0; k < K; k++) sum += (TA ? A[k * lda + m] : A[m * lda + k]) * (TB ? B[n * ldb + k] : B[k * ldb + n]);
    C[m * ldc + n] = sum;
  }
}

// Raw chunk inputs: RA = [r; a], KB = [k; b] (rows = steps), LAM = lambda. Steps past T: zeros, lambda 0.
template <int NTH>
__device__ void load_keys(const Args& p, int bb, int h, int t0, float* RA, float* KB, float* LAM) {
  for (int e = threadIdx.x; e < L * N / 4; e += NTH) {
    const int t = e / (N / 4), j = e % (N / 4) * 4, tt = t0 + t;
    float r[4] = {}, w[4] = {}, k[4] = {}, a[4] = {}, b[4] = {};
    if (tt < p.T) {
      const size_t o = idx(p, bb, tt, h) + j;
      ld4(p.r + o, r), ld4(p.w + o, w), ld4(p.k + o, k), ld4(p.a + o, a), ld4(p.b + o, b);
    }
    for (int q = 0; q < 4; q++) {
      RA[t * LDN + j + q] = r[q], RA[(L + t) * LDN + j + q] = a[q];
      KB[t * LDN + j + q] = k[q], KB[(L + t) * LDN + j + q] = b[q];
      LAM[t * LDN + j + q] = tt < p.T ? LOG_DECAY_SCALE / (1.f + __expf(-w[q])) : 0.f;
    }
  }
}
// Value-indexed chunk rows (v, dy) of this block's NV rows -> dst[t][i]; steps past T are zeros.
template <int NV, int NTH>
__device__ void load_rows(const Args& p, const bf16* x, int bb, int h, int t0, int row0, float* dst, int ld) {
  for (int e = threadIdx.x; e < L * NV / 4; e += NTH) {
    const int t = e / (NV / 4), i = e % (NV / 4) * 4, tt = t0 + t;
    float f[4] = {};
    if (tt < p.T) ld4(x + idx(p, bb, tt, h) + row0 + i, f);
    for (int q = 0; q < 4; q++) dst[t * ld + i + q] = f[q];
  }
}
template <int NV, int NTH>
__device__ void store_rows(const Args& p, bf16* x, int bb, int h, int t0, int row0, const float* src, int ld) {
  for (int e = threadIdx.x; e < L * NV / 4; e += NTH) {
    const int t = e / (NV / 4), i = e % (NV / 4) * 4, tt = t0 + t;
    if (tt < p.T) st4(x + idx(p, bb, tt, h) + row0 + i, src + t * ld + i);
  }
}
// NV rows of an N x N fp32 state between global memory (row length N) and shared memory (row length LDN).
template <int NV, bool TO_SMEM, int NTH>
__device__ void copy_state(float* smem_rows, float* g) {
  for (int e = threadIdx.x; e < NV * N / 4; e += NTH) {
    const int i = e / (N / 4), j = e % (N / 4) * 4;
    float4* s4 = reinterpret_cast<float4*>(smem_rows + i * LDN + j);
    float4* g4 = reinterpret_cast<float4*>(g + i * N + j);
    if (TO_SMEM) *s4 = *g4;
    else *g4 = *s4;
  }
}

// In place, from the raw inputs and LAM: RA = [r G_t; a G_{t-1}], KB = [k / G_t; b / G_t]; KBb = [k G_L / G_t;
// b G_L / G_t]; GL = G_L; LG = g_t if given. Thread: one key j, a run of steps (it sums lambda over the whole chunk).
template <int NTH>
__device__ void decay_factors(const float* LAM, float* RA, float* KB, float* KBb, float* GL, float* LG) {
  constexpr int steps = L * N / NTH;
  const int j = threadIdx.x % N, t_begin = threadIdx.x / N * steps;
  float gl = 0.f, gp = 0.f;
  for (int t = 0; t < L; t++) {
    const float lam = LAM[t * LDN + j];
    gl += lam;
    if (t < t_begin) gp += lam;
  }
  if (threadIdx.x < N) GL[j] = __expf(gl);
#pragma unroll
  for (int t = t_begin; t < t_begin + steps; t++) {
    const float g = gp + LAM[t * LDN + j];
    const float inv = __expf(-g), to_end = __expf(gl - g), k = KB[t * LDN + j], b = KB[(L + t) * LDN + j];
    RA[t * LDN + j] *= __expf(g), RA[(L + t) * LDN + j] *= __expf(gp);
    KB[t * LDN + j] = k * inv, KB[(L + t) * LDN + j] = b * inv;
    KBb[t * LDN + j] = k * to_end, KBb[(L + t) * LDN + j] = b * to_end;
    if (LG) LG[t * LDN + j] = g;
    gp = g;
  }
}
// TI = (I - M_ab)^-1 by substitution, one column per thread (threads 0..L-1); M_ab = M[L:, L:].
__device__ void invert(const float* M, float* TI) {
  const int s = threadIdx.x;
  if (s >= L) return;
  float x[L];  // x[t] = delta_ts + sum_{u<t} M_ab[t,u] x[u], applied column by column (short dependency chains)
#pragma unroll
  for (int t = 0; t < L; t++) x[t] = t == s ? 1.f : 0.f;
#pragma unroll
  for (int u = 0; u < L; u++) {
    TI[u * LDL + s] = x[u];
#pragma unroll
    for (int t = u + 1; t < L; t++) x[t] += M[(L + t) * LD2 + L + u] * x[u];
  }
}

template <int NV>
struct FwdSmem {  // offsets (floats) into dynamic shared memory; every size is a multiple of 8 (32 bytes)
  static constexpr int LDV = NV + 4, RA = 0, KB = RA + 2 * L * LDN, KBb = KB + 2 * L * LDN, LG = KBb + 2 * L * LDN,
                       GL = LG + L * LDN, S = GL + N, VU = S + NV * LDN, YX = VU + 2 * L * LDV, M = YX + 2 * L * LDV,
                       TI = M + 2 * L * LD2, SIZE = TI + L * LDL;
};

template <int NV>
__global__ void __launch_bounds__(NT) wkv7_forward(Args p, const float* s0, bf16* y, float* sT, float* ckpt) {
  using F = FwdSmem<NV>;
  constexpr int LDV = F::LDV, G = N / NV, NTH = NT, NW = NT / 32;
  extern __shared__ __align__(128) float smem[];
  float *RA = smem + F::RA, *KB = smem + F::KB, *KBb = smem + F::KBb, *LG = smem + F::LG, *GL = smem + F::GL,
        *S = smem + F::S, *VU = smem + F::VU, *YX = smem + F::YX, *M = smem + F::M, *TI = smem + F::TI;
  const int bh = blockIdx.x / G, h = bh % p.H, bb = bh / p.H, row0 = blockIdx.x % G * NV, nC = (p.T + L - 1) / L;
  const size_t rows = ((size_t)bh * N + row0) * N;  // this block's rows in a (B, H, N, N) state
  copy_state<NV, true, NTH>(S, const_cast<float*>(s0) + rows);
  for (int c = 0; c < nC; c++) {
    const int t0 = c * L;
    __syncthreads();
    if (c) store_rows<NV, NTH>(p, y, bb, h, t0 - L, row0, YX, LDV);
    copy_state<NV, false, NTH>(S, ckpt + ((size_t)bh * (nC + 1) + c) * N * N + row0 * N);
    load_keys<NTH>(p, bb, h, t0, RA, KB, LG);
    load_rows<NV, NTH>(p, p.v, bb, h, t0, row0, VU, LDV);
    __syncthreads();
    decay_factors<NTH>(LG, RA, KB, KBb, GL, nullptr);
    __syncthreads();
    mm<NW, false, true, 1, true, 2 * L, 2 * L, N, LDN, LDN, LD2>(M, RA, KB, false);  // M = mask([R; A] [K^; B^]^T)
    mm<NW, false, true, 1, false, 2 * L, NV, N, LDN, LDN, LDV>(YX, RA, S, false);          // [Y; X] = [R; A] S0^T
    __syncthreads();
    invert(M, TI);
    mm<NW, false, false, 1, false, 2 * L, NV, L, LD2, LDV, LDV>(YX, M, VU, true);  // [Y; X] += [M_rk; M_ak] V
    for (int e = threadIdx.x; e < NV * N; e += NTH) S[e / N * LDN + e % N] *= GL[e % N];
    __syncthreads();
    mm<NW, false, false, 1, false, L, NV, L, LDL, LDV, LDV>(VU + L * LDV, TI, YX + L * LDV, false);  // U = (I - M_ab)^-1 X
    __syncthreads();
    mm<NW, false, false, 1, false, L, NV, L, LD2, LDV, LDV>(YX, M + L, VU + L * LDV, true);  // Y += M_rb U
    mm<NW, true, false, 1, false, NV, N, 2 * L, LDV, LDN, LDN>(S, VU, KBb, true);           // S += [V; U]^T [K_; B_]
  }
  __syncthreads();
  if (nC) store_rows<NV, NTH>(p, y, bb, h, (nC - 1) * L, row0, YX, LDV);
  copy_state<NV, false, NTH>(S, sT + rows);  // (ckpt's last slot, wkv7.cu's final state, is not used here)
}

template <int NV>
struct BwdSmem {
  static constexpr int LDV = NV + 4, RA = 0, KB = RA + 2 * L * LDN, KBb = KB + 2 * L * LDN, dRA = KBb + 2 * L * LDN,
                       dKB = dRA + 2 * L * LDN, dKBb = dKB + 2 * L * LDN, LAM = dKBb + 2 * L * LDN, LG = LAM + L * LDN,
                       GL = LG + L * LDN, DGL = GL + N, S0 = DGL + N, dS = S0 + NV * LDN, dS2 = dS + NV * LDN,
                       VU = dS2 + NV * LDN, dYX = VU + 2 * L * LDV, dVU = dYX + 2 * L * LDV, X = dVU + 2 * L * LDV,
                       M = X + L * LDV, D = M + 2 * L * LD2, TI = D + 2 * L * LD2, SIZE = TI + L * LDL;
};

// Key-side gradients: written directly when one block holds the whole head, else summed in fp32 scratch.
template <int G>
__device__ __forceinline__ void put(bf16* out, float* acc, size_t o, float x) {
  if (G == 1) out[o] = __float2bfloat16_rn(x);
  else atomicAdd(acc + o, x);
}

template <int NV>
__global__ void __launch_bounds__(NT_BWD)
    wkv7_backward(Args p, const float* ckpt, const bf16* dy, const float* dsT, bf16* dr, bf16* dw, bf16* dk, bf16* dv,
                  bf16* da, bf16* db, float* ds0, float* gacc) {
  using F = BwdSmem<NV>;
  constexpr int LDV = F::LDV, G = N / NV, NTH = NT_BWD, NW = NT_BWD / 32;
  extern __shared__ __align__(128) float smem[];
  float *RA = smem + F::RA, *KB = smem + F::KB, *KBb = smem + F::KBb, *dRA = smem + F::dRA, *dKB = smem + F::dKB,
        *dKBb = smem + F::dKBb, *LAM = smem + F::LAM, *LG = smem + F::LG, *GL = smem + F::GL, *DGL = smem + F::DGL,
        *S0 = smem + F::S0, *dS = smem + F::dS, *dS2 = smem + F::dS2, *VU = smem + F::VU, *dYX = smem + F::dYX,
        *dVU = smem + F::dVU, *X = smem + F::X, *M = smem + F::M, *D = smem + F::D, *TI = smem + F::TI;
  const int bh = blockIdx.x / G, h = bh % p.H, bb = bh / p.H, row0 = blockIdx.x % G * NV, nC = (p.T + L - 1) / L;
  const size_t rows = ((size_t)bh * N + row0) * N, BTHN = (size_t)gridDim.x / G * p.T * N;
  copy_state<NV, true, NTH>(dS, const_cast<float*>(dsT) + rows);
  for (int c = nC - 1; c >= 0; c--) {
    const int t0 = c * L;
    __syncthreads();
    load_keys<NTH>(p, bb, h, t0, RA, KB, LAM);
    load_rows<NV, NTH>(p, p.v, bb, h, t0, row0, VU, LDV);
    load_rows<NV, NTH>(p, dy, bb, h, t0, row0, dYX, LDV);
    copy_state<NV, true, NTH>(S0, const_cast<float*>(ckpt) + ((size_t)bh * (nC + 1) + c) * N * N + row0 * N);
    __syncthreads();
    decay_factors<NTH>(LAM, RA, KB, KBb, GL, LG);
    if (threadIdx.x < N) {  // d G_L (this block's rows) = sum_i S0[i,j] dS[i,j]
      float acc = 0.f;
      for (int i = 0; i < NV; i++) acc += S0[i * LDN + threadIdx.x] * dS[i * LDN + threadIdx.x];
      DGL[threadIdx.x] = acc;
    }
    __syncthreads();
    mm<NW, false, true, 1, true, 2 * L, 2 * L, N, LDN, LDN, LD2>(M, RA, KB, false);  // M
    mm<NW, false, true, 1, false, L, NV, N, LDN, LDN, LDV>(X, RA + L * LDN, S0, false);    // X = A S0^T
    mm<NW, false, true, 1, false, 2 * L, NV, N, LDN, LDN, LDV>(dVU, KBb, dS, false);        // [dV; dU] = [K_; B_] dS^T
    __syncthreads();
    invert(M, TI);
    mm<NW, false, false, 1, false, L, NV, L, LD2, LDV, LDV>(X, M + L * LD2, VU, true);             // X += M_ak V
    mm<NW, true, false, 1, false, L, NV, L, LD2, LDV, LDV>(dVU + L * LDV, M + L, dYX, true);       // dU += M_rb^T dY
    __syncthreads();
    mm<NW, false, false, 1, false, L, NV, L, LDL, LDV, LDV>(VU + L * LDV, TI, X, false);            // U = (I - M_ab)^-1 X
    mm<NW, true, false, 1, false, L, NV, L, LDL, LDV, LDV>(dYX + L * LDV, TI, dVU + L * LDV, false);  // dX = (I - M_ab)^-T dU
    __syncthreads();
    mm<NW, false, true, 1, true, 2 * L, 2 * L, NV, LDV, LDV, LD2>(D, dYX, VU, false);  // D = mask([dY; dX] [V; U]^T)
    mm<NW, false, false, 1, false, 2 * L, N, NV, LDV, LDN, LDN>(dKBb, VU, dS, false);        // d[K_; B_] = [V; U] dS
    mm<NW, true, false, 1, false, NV, N, 2 * L, LDV, LDN, LDN>(dS2, dYX, RA, false);         // dS0 = [dY; dX]^T [R; A] ...
    mm<NW, false, false, 1, false, 2 * L, N, NV, LDV, LDN, LDN>(dRA, dYX, S0, false);        // d[R; A] = [dY; dX] S0 ...
    mm<NW, true, false, 1, false, L, NV, 2 * L, LD2, LDV, LDV>(dVU, M, dYX, true);            // dV += [M_rk; M_ak]^T [dY; dX]
    __syncthreads();
    mm<NW, false, false, 1, false, 2 * L, N, 2 * L, LD2, LDN, LDN>(dRA, D, KB, true);  // ... + D [K^; B^]
    mm<NW, true, false, 1, false, 2 * L, N, 2 * L, LD2, LDN, LDN>(dKB, D, RA, false);  // d[K^; B^] = D^T [R; A]
    for (int e = threadIdx.x; e < NV * N; e += NTH) dS2[e / N * LDN + e % N] += dS[e / N * LDN + e % N] * GL[e % N];
    store_rows<NV, NTH>(p, dv, bb, h, t0, row0, dVU, LDV);
    __syncthreads();
    for (int e = threadIdx.x; e < L * N; e += NTH) {  // chain rule through the G factors
      const int t = e / N, j = e % N, tt = t0 + t;
      const float g = LG[t * LDN + j], gp = t ? LG[(t - 1) * LDN + j] : 0.f, gl = LG[(L - 1) * LDN + j];
      const int r_ = t * LDN + j, a_ = (L + t) * LDN + j;  // rows of r, k (first half) and a, b (second half)
      const float dR = dRA[r_], dA = dRA[a_], dK = dKB[r_], dB = dKB[a_], dK_ = dKBb[r_], dB_ = dKBb[a_];
      const float inv = __expf(-g), to_end = __expf(gl - g);
      if (tt < p.T) {
        const size_t o = idx(p, bb, tt, h) + j;
        put<G>(dr, gacc, o, dR * __expf(g));
        put<G>(dk, gacc + 2 * BTHN, o, dK * inv + dK_ * to_end);
        put<G>(da, gacc + 3 * BTHN, o, dA * __expf(gp));
        put<G>(db, gacc + 4 * BTHN, o, dB * inv + dB_ * to_end);
      }
      // d g_t terms: e_t at t, f_t at t-1, and those of G_L (added to every step of the chunk)
      dRA[r_] = dR * RA[r_] - dK * KB[r_] - dB * KB[a_] - dK_ * KBb[r_] - dB_ * KBb[a_];
      dRA[a_] = dA * RA[a_];
      dKBb[r_] = dK_ * KBb[r_] + dB_ * KBb[a_];
    }
    __syncthreads();
    if (threadIdx.x < N) {  // d lambda_s = sum_{t >= s} d g_t; dw = d lambda * d lambda / dw
      const int j = threadIdx.x;
      float acc = DGL[j] * GL[j], f = 0.f;
      for (int t = 0; t < L; t++) acc += dKBb[t * LDN + j];
      for (int t = L - 1; t >= 0; t--) {
        acc += dRA[t * LDN + j];
        const float dl = acc + f, lam = LAM[t * LDN + j];
        f += dRA[(L + t) * LDN + j];
        if (t0 + t < p.T) put<G>(dw, gacc + BTHN, idx(p, bb, t0 + t, h) + j, dl * lam * (1.f - lam / LOG_DECAY_SCALE));
      }
    }
    float* tmp = dS;
    dS = dS2, dS2 = tmp;
  }
  __syncthreads();
  copy_state<NV, false, NTH>(dS, ds0 + rows);
}
}  // namespace wkv7

#ifdef WKV7_NO_TORCH  // device code only (.ci/hip_check.sh): instantiate every kernel so that all of it compiles
namespace wkv7 {
template __global__ void wkv7_forward<16>(Args, const float*, bf16*, float*, float*);
template __global__ void wkv7_forward<32>(Args, const float*, bf16*, float*, float*);
template __global__ void wkv7_forward<64>(Args, const float*, bf16*, float*, float*);
template __global__ void wkv7_backward<16>(Args, const float*, const bf16*, const float*, bf16*, bf16*, bf16*, bf16*,
                                           bf16*, bf16*, float*, float*);
}  // namespace wkv7
#endif

#ifndef WKV7_NO_TORCH
// ---- host side: torch ops wkv7_nN::forward / backward (explicit schemas with mutated outputs) ----
#ifndef WKV7_EMU
#include <ATen/ATen.h>
#include <ATen/hip/impl/HIPGuardImplMasqueradingAsCUDA.h>
#include <ATen/hip/impl/HIPStreamMasqueradingAsCUDA.h>
#include <torch/library.h>
#define WKV7_DISPATCH CUDA  // ROCm builds of torch use the CUDA dispatch key
#define WKV7_LAUNCH(kern, blocks, threads, smem, ...)                                            \
  do {                                                                                    \
    const at::hip::HIPGuardMasqueradingAsCUDA guard(r.device());                          \
    kern<<<blocks, threads, smem, at::hip::getCurrentHIPStreamMasqueradingAsCUDA()>>>(__VA_ARGS__); \
    TORCH_CHECK(hipGetLastError() == hipSuccess, "wkv7: kernel launch failed");           \
  } while (0)
#endif
#ifndef WKV7_NS
#define WKV7_NS wkv7_n64
#endif
#define WKV7_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // one more expansion, so that WKV7_NS is replaced
#define WKV7_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

namespace wkv7 {
using at::Tensor;
constexpr int NV_BWD_MAX = 16;  // state rows per backward block: more do not fit the 64 KB of LDS
static int rows_per_block(int64_t nv, int64_t heads, int64_t want_blocks) {
  TORCH_CHECK(nv == 0 || nv == 16 || nv == 32 || nv == 64, "nv must be 0 (auto), 16, 32 or 64");
  if (nv == 0)  // split heads over blocks until there are enough blocks
    for (nv = N > 64 ? 64 : N; nv > 16 && heads * (N / nv) < want_blocks; nv /= 2) {}
  TORCH_CHECK(nv <= N, "nv larger than the head size");
  return (int)nv;
}
static Args check(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b) {
  for (const Tensor* x : {&r, &w, &k, &v, &a, &b}) {
    TORCH_CHECK(x->dtype() == at::kBFloat16 && x->is_contiguous() && x->sizes() == r.sizes(),
                "wkv7: r, w, k, v, a, b must be contiguous bf16 tensors of one shape (B, T, H, N)");
  }
  TORCH_CHECK(r.dim() == 4 && r.size(3) == N, "wkv7: this build is for head size ", N);
  auto ptr = [](const Tensor& x) { return reinterpret_cast<const bf16*>(x.data_ptr()); };
  return Args{ptr(r), ptr(w), ptr(k), ptr(v), ptr(a), ptr(b), (int)r.size(1), (int)r.size(2)};
}

void forward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
             const Tensor& s0, Tensor& y, Tensor& sT, Tensor& ckpt, int64_t nv) {
  const Args p = check(r, w, k, v, a, b);
  const int64_t heads = r.size(0) * r.size(2);
  TORCH_CHECK(ckpt.numel() == heads * ((p.T + L - 1) / L + 1) * N * N && s0.numel() == heads * N * N, "wkv7: sizes");
  auto run = [&](auto nv_) {
    constexpr int NV = decltype(nv_)::value;
    const size_t smem = FwdSmem<NV>::SIZE * sizeof(float);
    WKV7_LAUNCH(wkv7_forward<NV>, (unsigned)(heads * (N / NV)), NT, smem, p, s0.data_ptr<float>(),
                reinterpret_cast<bf16*>(y.data_ptr()), sT.data_ptr<float>(), ckpt.data_ptr<float>());
  };
  switch (rows_per_block(nv, heads, 264)) {
    case 16: run(std::integral_constant<int, 16>()); break;
    case 32: run(std::integral_constant<int, 32>()); break;
    default: run(std::integral_constant<int, N < 64 ? N : 64>());
  }
}

void backward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
              const Tensor& ckpt, const Tensor& dy, const Tensor& dsT, Tensor& dr, Tensor& dw, Tensor& dk, Tensor& dv,
              Tensor& da, Tensor& db, Tensor& ds0, int64_t nv) {
  const Args p = check(r, w, k, v, a, b);
  const int64_t heads = r.size(0) * r.size(2);
  const int NV = rows_per_block(NV_BWD_MAX, heads, 132);  // always NV_BWD_MAX: more rows do not fit the LDS
  Tensor gacc;  // fp32 sums of the key-side gradients when a head is split over several blocks
  if (NV < N) gacc = at::zeros({5, r.numel()}, r.options().dtype(at::kFloat));
  auto bp = [](Tensor& x) { return reinterpret_cast<bf16*>(x.data_ptr()); };
  auto run = [&](auto nv_) {
    constexpr int NV = decltype(nv_)::value;
    const size_t smem = BwdSmem<NV>::SIZE * sizeof(float);
    WKV7_LAUNCH(wkv7_backward<NV>, (unsigned)(heads * (N / NV)), NT_BWD, smem, p, ckpt.data_ptr<float>(),
                reinterpret_cast<const bf16*>(dy.data_ptr()), dsT.data_ptr<float>(), bp(dr), bp(dw), bp(dk), bp(dv),
                bp(da), bp(db), ds0.data_ptr<float>(), NV < N ? gacc.data_ptr<float>() : nullptr);
  };
  switch (NV) {
    case 16: run(std::integral_constant<int, 16>()); break;
    case 32: run(std::integral_constant<int, 32>()); break;
    default: run(std::integral_constant<int, N < 64 ? N : 64>());
  }
  if (NV < N) {
    Tensor* outs[5] = {&dr, &dw, &dk, &da, &db};
    for (int i = 0; i < 5; i++) outs[i]->view(-1).copy_(gacc[i]);
  }
}
}  // namespace wkv7

WKV7_LIBRARY(WKV7_NS, m) {
  m.def("chunk_len() -> int", []() -> int64_t { return wkv7::LB; });  // steps per saved state (sizes ckpt)
  m.def("forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s0, "
        "Tensor(a!) y, Tensor(b!) sT, Tensor(c!) ckpt, int nv) -> ()");
  m.def("backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor ckpt, Tensor dy, Tensor dsT, "
        "Tensor(a!) dr, Tensor(b!) dw, Tensor(c!) dk, Tensor(d!) dv, Tensor(e!) da, Tensor(f!) db, Tensor(g!) ds0, "
        "int nv) -> ()");
}
WKV7_LIBRARY_IMPL(WKV7_NS, WKV7_DISPATCH, m) {
  m.impl("forward", &wkv7::forward);
  m.impl("backward", &wkv7::backward);
}
#endif
