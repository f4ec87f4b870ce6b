// CPU emulation of what wkv7.cu and wkv7_hip.cpp use of CUDA/HIP, to run their kernels without a GPU (slowly):
// each GPU thread is a std::thread, __syncthreads a barrier, and a wmma fragment holds its whole tile in every lane.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 gridDim, blockDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__
inline std::barrier<>* emu_block_barrier;
inline std::vector<std::barrier<>*> emu_warp_barriers;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp() { emu_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
// asynchronous global -> shared copies: done at once here, so a missing wait shows only on the GPU
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n) { std::memcpy(dst, src, n); }
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}
inline float emu_lanes[1024];  // one slot per thread of the block: __shfl_xor_sync goes through it
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {  // every lane of the warp calls it, as on the GPU
  emu_lanes[threadIdx.x] = v;
  __syncwarp();
  const float other = emu_lanes[threadIdx.x ^ lane_mask];
  __syncwarp();
  return other;
}
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even (no NaN inputs here)
  const unsigned u = __float_as_uint(f);
  return __nv_bfloat16{(uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16)};
}
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {}; struct matrix_a {}; struct matrix_b {}; struct accumulator {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int Nn, int K, class T, class Layout = void> struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : Nn;
  static constexpr int num_elements = rows * cols;  // the whole tile, row-major, in every lane
  float x[num_elements];
};
inline float __float_to_tf32(float f) {  // round to nearest (ties away) to 10 mantissa bits
  return __uint_as_float((__float_as_uint(f) + 0x1000u) & 0xffffe000u);
}
template <class Use, int M, int Nn, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, Nn, K, T, Layout>& f, const float* p, unsigned ld) {
  using F = fragment<Use, M, Nn, K, T, Layout>;
  for (int i = 0; i < F::rows; i++)
    for (int j = 0; j < F::cols; j++)
      f.x[i * F::cols + j] = std::is_same<Layout, col_major>::value ? p[j * ld + i] : p[i * ld + j];
}
template <int M, int Nn, int K>
void load_matrix_sync(fragment<accumulator, M, Nn, K, float>& f, const float* p, unsigned ld, layout_t) {
  for (int i = 0; i < M; i++) for (int j = 0; j < Nn; j++) f.x[i * Nn + j] = p[i * ld + j];
}
template <int M, int Nn, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, Nn, K, float>& f, unsigned ld, layout_t) {
  if (threadIdx.x % 32 == 0)  // one lane writes the tile (the hardware spreads it over the warp)
    for (int i = 0; i < M; i++) for (int j = 0; j < Nn; j++) p[i * ld + j] = f.x[i * Nn + j];
  __syncwarp();
}
template <class Frag> void fill_fragment(Frag& f, float v) { for (auto& e : f.x) e = v; }
template <int M, int Nn, int K, class LA, class LB>
void mma_sync(fragment<accumulator, M, Nn, K, float>& d, const fragment<matrix_a, M, Nn, K, precision::tf32, LA>& a,
              const fragment<matrix_b, M, Nn, K, precision::tf32, LB>& b,
              const fragment<accumulator, M, Nn, K, float>& c) {
  float out[M * Nn];
  for (int i = 0; i < M; i++)
    for (int j = 0; j < Nn; j++) {
      float s = c.x[i * Nn + j];
      for (int k = 0; k < K; k++) s += __float_to_tf32(a.x[i * K + k]) * __float_to_tf32(b.x[k * Nn + j]);
      out[i * Nn + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}}  // namespace nvcuda::wmma
namespace wkv7 { alignas(128) float smem[65536]; }  // one block runs at a time: its dynamic shared memory
// Run a kernel body over a grid, one block after another, each block's threads as std::threads.
inline void emu_launch(unsigned blocks, unsigned threads, const std::function<void()>& body) {
  gridDim.x = blocks, blockDim.x = threads;
  for (unsigned bx = 0; bx < blocks; bx++) {
    std::barrier<> block_bar(threads);
    std::vector<std::barrier<>*> warps;
    for (unsigned w = 0; w < threads / 32; w++) warps.push_back(new std::barrier<>(32));
    emu_block_barrier = &block_bar, emu_warp_barriers = warps;
    std::memset(wkv7::smem, 0xff, sizeof(wkv7::smem));  // NaN: shared memory read before written shows up
    std::vector<std::thread> ts;
    for (unsigned tx = 0; tx < threads; tx++)
      ts.emplace_back([=, &body] { threadIdx.x = tx, blockIdx.x = bx; body(); });
    for (auto& t : ts) t.join();
    for (auto* w : warps) delete w;
  }
}
