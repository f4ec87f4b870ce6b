// wkv7.cu: the RWKV-7 WKV recurrence, forward and backward, in chunks of 16 steps on the tensor cores.
//
// What it computes (the same as wkv7_sequential in model.py), per batch b, head h, step t, with the fp32 state
// S [value i, key j] of each head:
//     sa_i = sum_j a_j S[i,j];   S[i,j] = S[i,j] decay_j + sa_i b_j + v_i k_j;   y_i = sum_j S[i,j] r_j
// with decay = exp(lambda), lambda = -exp(-0.5) sigmoid(w) (w is the raw decay input). Inputs r, w, k, v, a, b:
// bf16 (B, T, H, N), N = _N_ (64); state in / out: fp32 (B, H, N, N); y: bf16 (B, T, H, N). Any T (the last
// chunk is padded inside with steps that leave the state alone), any B and H.
//
// Algorithm. Per chunk of L = 16 steps, with G_t = exp(g_t), g_t = cumulative lambda (inclusive), write
//   R = r G_t, A = a G_{t-1}, K^ = k / G_t, B^ = b / G_t, K_ = k G_L / G_t, B_ = b G_L / G_t   (L x N each)
//   M = causal mask of [R; A] [K^; B^]^T (2L x 2L: blocks rk rb / ak ab; r rows keep s <= t, a rows s < t)
// Then, S0 being the state at the chunk start (rows = value index):
//   X = A S0^T + M_ak V,  U = (I - M_ab)^-1 X  (U_t = sa_t),  Y = R S0^T + M_rk V + M_rb U,
//   S_L = S0 diag(G_L) + V^T K_ + U^T B_.
// All products run on the tensor cores (wmma, tf32; the small chunk-sized ones in split tf32 = 3 passes, which
// is about fp32). Only (I - M_ab)^-1 is solved by substitution (16 threads). The forward stores S0 of every
// chunk and the final state (fp32, B*H*(ceil(T/16)+1)*N*N*4 bytes) for the backward, which walks the chunks in
// reverse with dS. Since K_ = K^ diag(G_L), it works with dS' = dS diag(G_L) and never forms K_, B_:
//   dU = M_rb^T dY + B^ dS'^T,  dX = (I - M_ab)^-T dU,  D = mask([dY; dX] [V; U]^T),
//   d[R; A] = [dY; dX] S0 + D [K^; B^],  d[K^; B^] = D^T [R; A] + [V; U] dS'  (the second term is the K_, B_ path),
//   dV = M_rk^T dY + M_ak^T dX + K^ dS'^T,  dS0 = dS' + [dY; dX]^T [R; A],
// then the chain rule through the G factors gives dr, da, dk, db and d lambda (a reverse cumulative sum in the
// chunk), and dw = d lambda * lambda * (1 - lambda / LOG_DECAY_SCALE). Every d lambda of a chunk also gets
// d log G_L = column sums of dS * S_L (S_L = the chunk's end state: the next saved one), since S_L is linear in G_L.
//
// Launch: one block of 256 threads per (b, h, group of NV value rows); rows of the state are independent, so
// a head splits into N / NV blocks when B*H is small (the key-side gradients of those blocks are then summed
// with fp32 atomics in a scratch buffer). Shared memory: 70 KB forward (3 blocks/SM), 113 KB backward (NV = 64:
// 2 blocks/SM on sm_90, which is why the backward keeps no K_, B_, lambda or second dS).
// Flags (model.py passes them): -D_N_=64 -DWKV7_NS=wkv7_n64 --use_fast_math -O3. Tuning macros (WKV7_CFLAGS):
// WKV7_TF32X=3 (state-sized products in split tf32 too), WKV7_TF32X_SMALL=1 (chunk-sized ones in plain tf32:
// ~10% faster, errors closer to the 4e-3 test bound), WKV7_BWD_THREADS, WKV7_FWD_THREADS, WKV7_FWD_MINB,
// WKV7_BWD_MINB, WKV7_UNROLL, and the chunk lengths WKV7_FWD_L and WKV7_BWD_L (16 each; the backward's must be a
// multiple of the forward's: the forward then saves every (BWD_L / FWD_L)-th chunk's start state, and ckpt holds
// ceil(T / BWD_L) + 1 states). BWD_L = 32 takes 214 KB at NV = 64 (one block per SM: pair it with BWD_MINB=1). sm_80+.
// Test: pytest -m gpu tests/test_wkv7_gpu.py   Bench: python bench.py

#ifndef WKV7_EMU
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <mma.h>
#endif
#include <type_traits>

#ifndef _N_
#define _N_ 64
#endif
#ifndef WKV7_TF32X
#define WKV7_TF32X 1
#endif
#ifndef WKV7_TF32X_SMALL
#define WKV7_TF32X_SMALL 3
#endif
#ifndef WKV7_UNROLL
#define WKV7_UNROLL 2
#endif
#ifndef WKV7_FWD_MINB
#define WKV7_FWD_MINB 3
#endif
#ifndef WKV7_BWD_MINB
#define WKV7_BWD_MINB 2  // two blocks per SM: 113 KB of shared memory and at most 128 registers each
#endif
#ifndef WKV7_BWD_THREADS
#define WKV7_BWD_THREADS 256
#endif
#ifndef WKV7_FWD_L
#define WKV7_FWD_L 16
#endif
#ifndef WKV7_BWD_L
#define WKV7_BWD_L 16
#endif
#ifndef WKV7_FWD_THREADS
#define WKV7_FWD_THREADS 256
#endif

namespace wkv7 {
using bf16 = __nv_bfloat16;
constexpr int N = _N_, NT = WKV7_FWD_THREADS, NT_BWD = WKV7_BWD_THREADS;  // threads per block: forward, backward
// chunk lengths: the forward's, and the backward's (a multiple of it), which is also the spacing of the saved states
constexpr int LF = WKV7_FWD_L, LB = WKV7_BWD_L;
constexpr int LDN = N + 4;  // padded row length of shared-memory tiles; chunk-sized ones: 2 L + 4, L + 4
constexpr int PB = WKV7_TF32X, PS = WKV7_TF32X_SMALL;     // tensor-core passes: state-sized, chunk-sized products
constexpr int UNROLL = WKV7_UNROLL;                        // k-steps per iteration in mm
constexpr float LOG_DECAY_SCALE = -0.6065306597126334f;    // lambda = LOG_DECAY_SCALE * sigmoid(w)
static_assert(N % 16 == 0 && N <= NT && LB * N % NT_BWD == 0 && LB % LF == 0 && N <= 8 * LB + 16,
              "head size, chunk lengths");  // the last: the backward's LAM (LB x N) fits in its M and D

struct Args {
  const bf16 *r, *w, *k, *v, *a, *b;  // (B, T, H, N)
  int T, H;
};
__device__ __forceinline__ size_t idx(const Args& p, int bb, int t, int h) { return (((size_t)bb * p.T + t) * p.H + h) * N; }

struct __align__(8) bf16x4 { bf16 x[4]; };
// 4 floats to shared memory in one 16-byte store (4 scalar stores from a warp's 32 threads would be a 4-way bank
// conflict: their addresses are 16 bytes apart)
__device__ __forceinline__ void st4s(float* p, const float* o) { *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]); }
// pairs: 2 floats in shared memory, 2 bf16 in global memory (8 and 4 bytes, one access each)
__device__ __forceinline__ float2 ld2s(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ void st2s(float* p, float x, float y) { *reinterpret_cast<float2*>(p) = make_float2(x, y); }
__device__ __forceinline__ float2 ld2(const bf16* p) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p)); }
__device__ __forceinline__ void ld4(const bf16* p, float* o) {
  bf16x4 u = *reinterpret_cast<const bf16x4*>(p);
  for (int q = 0; q < 4; q++) o[q] = __bfloat162float(u.x[q]);
}
__device__ __forceinline__ void st4(bf16* p, const float* o) {
  bf16x4 u;
  for (int q = 0; q < 4; q++) u.x[q] = __float2bfloat16_rn(o[q]);
  *reinterpret_cast<bf16x4*>(p) = u;
}

// C (= or +=) op(A) op(B), fp32 tiles in shared memory, op(X) = X or X^T; M, Nn multiples of 16, K of 8.
// PASSES = 1: tf32. PASSES = 3: split tf32 (x = hi + lo; hi*hi + hi*lo + lo*hi), about fp32 accuracy.
// CAUSAL = L zeroes entries of a 2L x 2L result outside the chunk masks (see the top); 0: no mask.
// Every size is a template argument (the loops unroll, the addresses are constants). NW = warps in the block.
// Warp w takes tiles w ^ W0, w ^ W0 + NW, ...: two products of 4 tiles in one phase run on different warps when one
// of them has W0 = NW / 2 (NW is a power of two), instead of both on warps 0-3 while 4-7 wait at the barrier.
template <int NW, bool TA, bool TB, int PASSES, int CAUSAL, int M, int Nn, int K, int lda, int ldb, int ldc, int W0 = 0>
__device__ void mm(float* C, const float* A, const float* B, bool acc) {
  using namespace nvcuda;
  using LA = typename std::conditional<TA, wmma::col_major, wmma::row_major>::type;
  using LB = typename std::conditional<TB, wmma::col_major, wmma::row_major>::type;
  constexpr int tiles_n = Nn / 16;
  for (int tile = threadIdx.x / 32 ^ W0; tile < M / 16 * tiles_n; tile += NW) {
    const int m0 = tile / tiles_n * 16, n0 = tile % tiles_n * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> c, c2;  // two accumulators: two dependency chains
    if (acc) wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
    else wmma::fill_fragment(c, 0.f);
    wmma::fill_fragment(c2, 0.f);
#pragma unroll UNROLL
    for (int k0 = 0; k0 < K; k0 += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> a, a2;
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> b, b2;
      wmma::load_matrix_sync(a, TA ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
      wmma::load_matrix_sync(b, TB ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
      for (int i = 0; i < a.num_elements; i++) {
        const float hi = wmma::__float_to_tf32(a.x[i]);
        if (PASSES == 3) a2.x[i] = wmma::__float_to_tf32(a.x[i] - hi);
        a.x[i] = hi;
      }
      for (int i = 0; i < b.num_elements; i++) {
        const float hi = wmma::__float_to_tf32(b.x[i]);
        if (PASSES == 3) b2.x[i] = wmma::__float_to_tf32(b.x[i] - hi);
        b.x[i] = hi;
      }
      if (PASSES == 3) {
        wmma::mma_sync(c2, a2, b, c2);
        wmma::mma_sync(c2, a, b2, c2);
        wmma::mma_sync(c, a, b, c);
      } else if (k0 & 8) {
        wmma::mma_sync(c2, a, b, c2);
      } else {
        wmma::mma_sync(c, a, b, c);
      }
    }
    for (int i = 0; i < c.num_elements; i++) c.x[i] += c2.x[i];
    wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
    if (CAUSAL) {
      __syncwarp();
      for (int e = threadIdx.x % 32; e < 256; e += 32) {
        const int t = m0 + e / 16, s = n0 + e % 16;
        if (s % CAUSAL > t % CAUSAL - (t >= CAUSAL)) C[t * ldc + s] = 0.f;
      }
    }
  }
}

// Raw chunk inputs: RA = [r; a], KB = [k; b] (rows = steps), LAM = lambda. Steps past T: zeros, lambda 0.
template <int L, int NTH>
__device__ void load_keys(const Args& p, int bb, int h, int t0, float* RA, float* KB, float* LAM) {
  for (int e = threadIdx.x; e < L * N / 4; e += NTH) {
    const int t = e / (N / 4), j = e % (N / 4) * 4, tt = t0 + t;
    float r[4] = {}, w[4] = {}, k[4] = {}, a[4] = {}, b[4] = {};
    if (tt < p.T) {
      const size_t o = idx(p, bb, tt, h) + j;
      ld4(p.r + o, r), ld4(p.w + o, w), ld4(p.k + o, k), ld4(p.a + o, a), ld4(p.b + o, b);
    }
    for (int q = 0; q < 4; q++) w[q] = tt < p.T ? LOG_DECAY_SCALE / (1.f + __expf(-w[q])) : 0.f;
    st4s(RA + t * LDN + j, r), st4s(RA + (L + t) * LDN + j, a), st4s(KB + t * LDN + j, k);
    st4s(KB + (L + t) * LDN + j, b), st4s(LAM + t * LDN + j, w);
  }
}
// Value-indexed chunk rows of this block's NV rows, NR arrays at once (v; dy): xs[x] -> dst[x][t][i]; steps past
// T are zeros. All NR loads are in flight before the first store (one wait for memory, not NR).
template <int L, int NV, int NTH, int NR>
__device__ void load_rows(const Args& p, const bf16* const (&xs)[NR], int bb, int h, int t0, int row0,
                          float* const (&dst)[NR], int ld) {
  for (int e = threadIdx.x; e < L * NV / 4; e += NTH) {
    const int t = e / (NV / 4), i = e % (NV / 4) * 4, tt = t0 + t;
    float f[NR][4] = {};
    if (tt < p.T)
      for (int x = 0; x < NR; x++) ld4(xs[x] + idx(p, bb, tt, h) + row0 + i, f[x]);
    for (int x = 0; x < NR; x++) st4s(dst[x] + t * ld + i, f[x]);
  }
}
template <int L, int NV, int NTH>
__device__ void store_rows(const Args& p, bf16* x, int bb, int h, int t0, int row0, const float* src, int ld) {
  for (int e = threadIdx.x; e < L * NV / 4; e += NTH) {
    const int t = e / (NV / 4), i = e % (NV / 4) * 4, tt = t0 + t;
    if (tt < p.T) {
      const float4 f = *reinterpret_cast<const float4*>(src + t * ld + i);
      const float g[4] = {f.x, f.y, f.z, f.w};
      st4(x + idx(p, bb, tt, h) + row0 + i, g);
    }
  }
}
// NV rows of an N x N fp32 state from global memory to shared memory as asynchronous copies: the loads after it go
// out without waiting for these, and async_state_wait() (then a barrier) waits once for all.
template <int NV, int NTH>
__device__ void async_state(float* smem_rows, const float* g) {
  for (int e = threadIdx.x; e < NV * N / 4; e += NTH)
    __pipeline_memcpy_async(smem_rows + e / (N / 4) * LDN + e % (N / 4) * 4, g + e / (N / 4) * N + e % (N / 4) * 4, 16);
  __pipeline_commit();
}
__device__ __forceinline__ void async_state_wait() { __pipeline_wait_prior(0); }
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
template <int L, int NTH>
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
template <int L>
__device__ void invert(const float* M, float* TI) {
  constexpr int LD2 = 2 * L + 4, LDL = L + 4;
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

template <int NV, int L = LF>
struct FwdSmem {  // offsets (floats) into dynamic shared memory; every size is a multiple of 8 (32 bytes)
  static constexpr int LD2 = 2 * L + 4, LDL = L + 4, LDV = NV + 4;
  static constexpr int RA = 0, KB = RA + 2 * L * LDN, KBb = KB + 2 * L * LDN, LG = KBb + 2 * L * LDN,
                       GL = LG + L * LDN, S = GL + N, VU = S + NV * LDN, YX = VU + 2 * L * LDV, M = YX + 2 * L * LDV,
                       TI = M + 2 * L * LD2, SIZE = TI + L * LDL;
};

template <int NV>
__global__ void __launch_bounds__(NT, WKV7_FWD_MINB) wkv7_forward(Args p, const float* s0, bf16* y, float* sT, float* ckpt) {
  using F = FwdSmem<NV>;
  constexpr int L = LF, LD2 = F::LD2, LDL = F::LDL, LDV = F::LDV, G = N / NV, NTH = NT, NW = NT / 32;
  constexpr int CK = LB / LF;  // the backward's chunks are CK of these: the state is saved every CK chunks
  extern __shared__ __align__(128) float smem[];
  float *RA = smem + F::RA, *KB = smem + F::KB, *KBb = smem + F::KBb, *LG = smem + F::LG, *GL = smem + F::GL,
        *S = smem + F::S, *VU = smem + F::VU, *YX = smem + F::YX, *M = smem + F::M, *TI = smem + F::TI;
  const int bh = blockIdx.x / G, h = bh % p.H, bb = bh / p.H, row0 = blockIdx.x % G * NV, nC = (p.T + L - 1) / L;
  const int nCB = (p.T + LB - 1) / LB;  // the backward's chunks: ckpt holds nCB + 1 states per head
  const size_t rows = ((size_t)bh * N + row0) * N;  // this block's rows in a (B, H, N, N) state
  float* ck = ckpt + (size_t)bh * (nCB + 1) * N * N + row0 * N;  // this block's rows of saved state i: ck + i N^2
  copy_state<NV, true, NTH>(S, const_cast<float*>(s0) + rows);
  for (int c = 0; c < nC; c++) {
    const int t0 = c * L;
    __syncthreads();
    if (c) store_rows<L, NV, NTH>(p, y, bb, h, t0 - L, row0, YX, LDV);
    if (c % CK == 0) copy_state<NV, false, NTH>(S, ck + (size_t)(c / CK) * N * N);
    load_keys<L, NTH>(p, bb, h, t0, RA, KB, LG);
    load_rows<L, NV, NTH, 1>(p, {p.v}, bb, h, t0, row0, {VU}, LDV);
    __syncthreads();
    decay_factors<L, NTH>(LG, RA, KB, KBb, GL, nullptr);
    __syncthreads();
    mm<NW, false, true, PS, L, 2 * L, 2 * L, N, LDN, LDN, LD2>(M, RA, KB, false);  // M = mask([R; A] [K^; B^]^T)
    mm<NW, false, true, PB, 0, 2 * L, NV, N, LDN, LDN, LDV>(YX, RA, S, false);          // [Y; X] = [R; A] S0^T
    __syncthreads();
    invert<L>(M, TI);
    mm<NW, false, false, PS, 0, 2 * L, NV, L, LD2, LDV, LDV>(YX, M, VU, true);  // [Y; X] += [M_rk; M_ak] V
    for (int e = threadIdx.x; e < NV * N; e += NTH) S[e / N * LDN + e % N] *= GL[e % N];
    __syncthreads();
    mm<NW, false, false, PS, 0, L, NV, L, LDL, LDV, LDV>(VU + L * LDV, TI, YX + L * LDV, false);  // U = (I - M_ab)^-1 X
    __syncthreads();
    mm<NW, false, false, PS, 0, L, NV, L, LD2, LDV, LDV>(YX, M + L, VU + L * LDV, true);  // Y += M_rb U
    mm<NW, true, false, PB, 0, NV, N, 2 * L, LDV, LDN, LDN>(S, VU, KBb, true);           // S += [V; U]^T [K_; B_]
  }
  __syncthreads();
  if (nC) store_rows<L, NV, NTH>(p, y, bb, h, (nC - 1) * L, row0, YX, LDV);
  copy_state<NV, false, NTH>(S, sT + rows);
  copy_state<NV, false, NTH>(S, ck + (size_t)nCB * N * N);  // the backward's last S_end
}

template <int NV, int L = LB>
struct BwdSmem {  // 113 KB at NV = 64, L = 16 (two blocks per SM on sm_90)
  static constexpr int LD2 = 2 * L + 4, LDL = L + 4, LDV = NV + 4;
  static constexpr int RA = 0, KB = RA + 2 * L * LDN, dRA = KB + 2 * L * LDN, dKB = dRA + 2 * L * LDN,
                       LG = dKB + 2 * L * LDN, GL = LG + L * LDN, DGL = GL + N, S0 = DGL + N, dS = S0 + NV * LDN,
                       VU = dS + NV * LDN, dYX = VU + 2 * L * LDV, dVU = dYX + 2 * L * LDV, X = dVU + 2 * L * LDV,
                       M = X + L * LDV, D = M + 2 * L * LD2, TI = D + 2 * L * LD2, SIZE = TI + L * LDL;
};

// Key-side gradients: written directly when one block holds the whole head, else summed in fp32 scratch.
template <int G>
__device__ __forceinline__ void put(bf16* out, float* acc, size_t o, float x) {
  if (G == 1) out[o] = __float2bfloat16_rn(x);
  else atomicAdd(acc + o, x);
}
template <int G>  // 2 consecutive keys
__device__ __forceinline__ void put2(bf16* out, float* acc, size_t o, float x0, float x1) {
  if (G == 1) *reinterpret_cast<__nv_bfloat162*>(out + o) = __floats2bfloat162_rn(x0, x1);
  else atomicAdd(acc + o, x0), atomicAdd(acc + o + 1, x1);
}

// Column sums of this block's rows of dS * S (d log G_L of a chunk, with S its end state and dS the gradient there).
// Four lanes of a warp share a column (lane / 8 = part q takes rows 8m + 2q and 8m + 2q + 1: with rows N + 4 floats
// apart, the 32 lanes hit 32 banks), then add up with two shuffles; every warp works, with short dependency chains.
template <int NV, int NTH>
__device__ void dgl_sums(const float* dS, const float* S, float* DGL) {
  const int lane = threadIdx.x % 32, q = lane / 8;
  for (int j = threadIdx.x / 32 * 8 + lane % 8; j < N; j += NTH / 4) {
    float acc = 0.f;
#pragma unroll
    for (int m = 0; m < NV; m += 8) {
      const int i = (m + 2 * q) * LDN + j;
      acc += S[i] * dS[i] + S[i + LDN] * dS[i + LDN];
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 8);
    acc += __shfl_xor_sync(0xffffffffu, acc, 16);
    if (q == 0) DGL[j] = acc;
  }
}

#ifdef WKV7_PROFILE  // cycles between the backward's barriers, summed over blocks and chunks (thread 0's clock)
__device__ unsigned long long prof_cycles[16];
#define WKV7_PROF(k) \
  if (threadIdx.x == 0) { const long long now = clock64(); atomicAdd(&prof_cycles[k], now - prof_t), prof_t = now; }
#else
#define WKV7_PROF(k)
#endif

template <int NV>
__global__ void __launch_bounds__(NT_BWD, WKV7_BWD_MINB)
    wkv7_backward(Args p, const float* ckpt, const bf16* dy, const float* dsT, bf16* dr, bf16* dw, bf16* dk, bf16* dv,
                  bf16* da, bf16* db, float* ds0, float* gacc) {
  using F = BwdSmem<NV>;
  constexpr int L = LB, LD2 = F::LD2, LDL = F::LDL, LDV = F::LDV, G = N / NV, NTH = NT_BWD, NW = NT_BWD / 32;
  extern __shared__ __align__(128) float smem[];
  float *RA = smem + F::RA, *KB = smem + F::KB, *dRA = smem + F::dRA, *dKB = smem + F::dKB, *LG = smem + F::LG,
        *GL = smem + F::GL, *DGL = smem + F::DGL, *S0 = smem + F::S0, *dS = smem + F::dS, *VU = smem + F::VU,
        *dYX = smem + F::dYX, *dVU = smem + F::dVU, *X = smem + F::X, *M = smem + F::M, *D = smem + F::D,
        *TI = smem + F::TI;
  const int bh = blockIdx.x / G, h = bh % p.H, bb = bh / p.H, row0 = blockIdx.x % G * NV, nC = (p.T + L - 1) / L;
  const size_t rows = ((size_t)bh * N + row0) * N, BTHN = (size_t)gridDim.x / G * p.T * N;
  const float* ck = ckpt + (size_t)bh * (nC + 1) * N * N + row0 * N;  // this block's rows of chunk c's S0: ck + c N^2
  copy_state<NV, true, NTH>(dS, const_cast<float*>(dsT) + rows);
  copy_state<NV, true, NTH>(S0, const_cast<float*>(ck) + (size_t)nC * N * N);  // the last chunk's end state
  __syncthreads();
  dgl_sums<NV, NTH>(dS, S0, DGL);
#ifdef WKV7_PROFILE
  long long prof_t = clock64();
#endif
  for (int c = nC - 1; c >= 0; c--) {
    const int t0 = c * L;
    __syncthreads(); WKV7_PROF(0);
    async_state<NV, NTH>(S0, ck + (size_t)c * N * N);  // first: in flight during the loads below
    load_keys<L, NTH>(p, bb, h, t0, RA, KB, LG);  // LG: lambda for now
    load_rows<L, NV, NTH, 2>(p, {p.v, dy}, bb, h, t0, row0, {VU, dYX}, LDV);
    async_state_wait();
    __syncthreads(); WKV7_PROF(1);
    if (threadIdx.x < N) {  // g_t = cumulative lambda, in place; G_L
      float g = 0.f;
      for (int t = 0; t < L; t++) g += LG[t * LDN + threadIdx.x], LG[t * LDN + threadIdx.x] = g;
      GL[threadIdx.x] = __expf(g);
    }
    __syncthreads(); WKV7_PROF(2);
    for (int e = threadIdx.x; e < L * N; e += NTH) {  // R = r G_t, A = a G_{t-1}, K^ = k / G_t, B^ = b / G_t
      const int t = e / N, j = e % N;
      const float g = LG[t * LDN + j], inv = __expf(-g);
      RA[t * LDN + j] *= __expf(g), RA[(L + t) * LDN + j] *= t ? __expf(LG[(t - 1) * LDN + j]) : 1.f;
      KB[t * LDN + j] *= inv, KB[(L + t) * LDN + j] *= inv;
    }
    for (int e = threadIdx.x; e < NV * N; e += NTH) dS[e / N * LDN + e % N] *= GL[e % N];  // dS diag(G_L) from here on
    __syncthreads(); WKV7_PROF(3);
    // with K_ = K^ diag(G_L): [K_; B_] dS^T = [K^; B^] (dS diag(G_L))^T, and the K_ gradient lands in dKB already
    // scaled by G_L, which is what the chain rule below needs
    mm<NW, false, true, PS, L, 2 * L, 2 * L, N, LDN, LDN, LD2>(M, RA, KB, false);  // M
    mm<NW, false, true, PB, 0, L, NV, N, LDN, LDN, LDV, NW / 2>(X, RA + L * LDN, S0, false);  // X = A S0^T
    mm<NW, false, true, PB, 0, 2 * L, NV, N, LDN, LDN, LDV>(dVU, KB, dS, false);         // [dV; dU] = [K_; B_] dS^T
    __syncthreads(); WKV7_PROF(4);
    invert<L>(M, TI);
    mm<NW, false, false, PS, 0, L, NV, L, LD2, LDV, LDV, NW / 2>(X, M + L * LD2, VU, true);     // X += M_ak V
    mm<NW, true, false, PS, 0, L, NV, L, LD2, LDV, LDV>(dVU + L * LDV, M + L, dYX, true);       // dU += M_rb^T dY
    __syncthreads(); WKV7_PROF(5);
    mm<NW, false, false, PS, 0, L, NV, L, LDL, LDV, LDV>(VU + L * LDV, TI, X, false);            // U = (I - M_ab)^-1 X
    mm<NW, true, false, PS, 0, L, NV, L, LDL, LDV, LDV, NW / 2>(dYX + L * LDV, TI, dVU + L * LDV, false);  // dX = (I - M_ab)^-T dU
    __syncthreads(); WKV7_PROF(6);
    mm<NW, false, true, PS, L, 2 * L, 2 * L, NV, LDV, LDV, LD2>(D, dYX, VU, false);  // D = mask([dY; dX] [V; U]^T)
    mm<NW, false, false, PB, 0, 2 * L, N, NV, LDV, LDN, LDN>(dKB, VU, dS, false);         // d[K^; B^] = [V; U] dS G_L ...
    mm<NW, false, false, PB, 0, 2 * L, N, NV, LDV, LDN, LDN>(dRA, dYX, S0, false);        // d[R; A] = [dY; dX] S0 ...
    mm<NW, true, false, PS, 0, L, NV, 2 * L, LD2, LDV, LDV, NW / 2>(dVU, M, dYX, true);      // dV += [M_rk; M_ak]^T [dY; dX]
    __syncthreads(); WKV7_PROF(7);
    mm<NW, false, false, PS, 0, 2 * L, N, 2 * L, LD2, LDN, LDN>(dRA, D, KB, true);  // ... + D [K^; B^]
    mm<NW, true, false, PS, 0, 2 * L, N, 2 * L, LD2, LDN, LDN>(dKB, D, RA, true);   // ... + D^T [R; A]
    mm<NW, true, false, PB, 0, NV, N, 2 * L, LDV, LDN, LDN>(dS, dYX, RA, true);     // dS0 = dS G_L + [dY; dX]^T [R; A]
    store_rows<L, NV, NTH>(p, dv, bb, h, t0, row0, dVU, LDV);
    __syncthreads(); WKV7_PROF(8);
    float* LAM = M;  // M and D are free from here on: this chunk's lambda, for dw below (w is read here, by all threads)
    const float dgl = threadIdx.x < N ? DGL[threadIdx.x] : 0.f;  // read now: dgl_sums rewrites DGL next to the dw loop
    for (int e = threadIdx.x; e < L * N / 2; e += NTH) {  // chain rule through the G factors, 2 keys per thread
      const int t = e / (N / 2), j = e % (N / 2) * 2, tt = t0 + t;
      const int r_ = t * LDN + j, a_ = (L + t) * LDN + j;  // rows of r, k (first half) and a, b (second half)
      const float2 zero = make_float2(0.f, 0.f), g = ld2s(LG + t * LDN + j), gp = t ? ld2s(LG + (t - 1) * LDN + j) : zero;
      const float2 w = tt < p.T ? ld2(p.w + idx(p, bb, tt, h) + j) : zero;  // before any store
      const float2 dR = ld2s(dRA + r_), dA = ld2s(dRA + a_), dK = ld2s(dKB + r_), dB = ld2s(dKB + a_);
      const float inv0 = __expf(-g.x), inv1 = __expf(-g.y);
      if (tt < p.T) {
        const size_t o = idx(p, bb, tt, h) + j;
        put2<G>(dr, gacc, o, dR.x * __expf(g.x), dR.y * __expf(g.y));
        put2<G>(dk, gacc + 2 * BTHN, o, dK.x * inv0, dK.y * inv1);
        put2<G>(da, gacc + 3 * BTHN, o, dA.x * __expf(gp.x), dA.y * __expf(gp.y));
        put2<G>(db, gacc + 4 * BTHN, o, dB.x * inv0, dB.y * inv1);
      }
      const float2 R = ld2s(RA + r_), A = ld2s(RA + a_), K = ld2s(KB + r_), Bb = ld2s(KB + a_);
      st2s(LAM + t * N + j, LOG_DECAY_SCALE / (1.f + __expf(-w.x)), LOG_DECAY_SCALE / (1.f + __expf(-w.y)));
      st2s(dRA + r_, dR.x * R.x - dK.x * K.x - dB.x * Bb.x, dR.y * R.y - dK.y * K.y - dB.y * Bb.y);  // d g_t terms:
      st2s(dRA + a_, dA.x * A.x, dA.y * A.y);                                                         // e_t, f_{t-1}
    }
    __syncthreads(); WKV7_PROF(9);
    if (threadIdx.x < N) {  // d lambda_s = sum_{t >= s} d g_t (+ d log G_L for all s); dw = d lambda * d lambda / dw
      const int j = threadIdx.x;
      float acc = dgl, f = 0.f;
      for (int t = L - 1; t >= 0; t--) {
        acc += dRA[t * LDN + j];
        const float dl = acc + f;
        f += dRA[(L + t) * LDN + j];
        const float lam = LAM[t * N + j];
        if (t0 + t < p.T) put<G>(dw, gacc + BTHN, idx(p, bb, t0 + t, h) + j, dl * lam * (1.f - lam / LOG_DECAY_SCALE));
      }
    }
    dgl_sums<NV, NTH>(dS, S0, DGL);  // for chunk c - 1, whose end state is this chunk's S0 (no barrier: see dgl)
  }
  __syncthreads();
  copy_state<NV, false, NTH>(dS, ds0 + rows);
}
}  // namespace wkv7

#ifndef WKV7_NO_TORCH
// ---- host side: torch ops wkv7_nN::forward / backward (explicit schemas with mutated outputs) ----
#ifndef WKV7_EMU
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#define WKV7_DISPATCH CUDA
#define WKV7_LAUNCH(kern, blocks, threads, smem, ...)                                                             \
  do {                                                                                                     \
    const c10::cuda::CUDAGuard guard(r.device());                                                          \
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(smem))); \
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, 100));      \
    kern<<<blocks, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);                       \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                        \
  } while (0)
#endif
#ifndef WKV7_NS
#define WKV7_NS wkv7_n64
#endif
#define WKV7_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // one more expansion, so that WKV7_NS is replaced
#define WKV7_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

namespace wkv7 {
using at::Tensor;
static int rows_per_block(int64_t nv, int64_t heads, int64_t want_blocks, int max_nv) {
  TORCH_CHECK(nv == 0 || nv == 16 || nv == 32 || nv == 64, "nv must be 0 (auto), 16, 32 or 64");
  if (nv == 0)  // split heads over blocks until there are enough blocks
    for (nv = max_nv; nv > 16 && heads * (N / nv) < want_blocks; nv /= 2) {}
  return (int)(nv < max_nv ? nv : max_nv);
}
// The most state rows per block: what fits this GPU's shared memory, and at most 32 for head size 128 (the backward's
// 64 rows would need 240 KB, more than an H100's 227; the forward with 64 rows has not been tested).
template <template <int, int> class Smem, int L>
static int max_rows(int dev) {
  int smem_max = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int nv = Smem<N < 64 ? N : 64, L>::SIZE * 4 <= smem_max ? 64 : Smem<32, L>::SIZE * 4 <= smem_max ? 32 : 16;
  TORCH_CHECK(Smem<16, L>::SIZE * 4 <= smem_max, "wkv7: head size ", N, " needs ", Smem<16, L>::SIZE * 4 / 1024,
              " KB of shared memory per block; this GPU has ", smem_max / 1024, " KB");
  return N > 64 ? (nv < 32 ? nv : 32) : nv < N ? nv : N;
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
  TORCH_CHECK(ckpt.numel() == heads * ((p.T + LB - 1) / LB + 1) * N * N && s0.numel() == heads * N * N, "wkv7: sizes");
  auto run = [&](auto nv_) {
    constexpr int NV = decltype(nv_)::value;
    const size_t smem = FwdSmem<NV>::SIZE * sizeof(float);
    WKV7_LAUNCH(wkv7_forward<NV>, (unsigned)(heads * (N / NV)), NT, smem, p, s0.data_ptr<float>(),
                reinterpret_cast<bf16*>(y.data_ptr()), sT.data_ptr<float>(), ckpt.data_ptr<float>());
  };
  switch (rows_per_block(nv, heads, 264, max_rows<FwdSmem, LF>(r.get_device()))) {
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
  const int NV = rows_per_block(nv, heads, 132, max_rows<BwdSmem, LB>(r.get_device()));
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
#ifdef WKV7_PROFILE
void prof_read(Tensor& out) {  // out: 16 int64 on the CPU; the sums start again from zero after each read
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(out.data_ptr(), prof_cycles, sizeof(prof_cycles)));
  const unsigned long long zero[16] = {};
  C10_CUDA_CHECK(cudaMemcpyToSymbol(prof_cycles, zero, sizeof(zero)));
}
#endif
}  // namespace wkv7

WKV7_LIBRARY(WKV7_NS, m) {
#ifdef WKV7_PROFILE
  m.def("prof_read(Tensor(a!) out) -> ()", &wkv7::prof_read);
#endif
  m.def("chunk_len() -> int", []() -> int64_t { return wkv7::LB; });  // ckpt: ceil(T / LB) + 1 states per head
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
