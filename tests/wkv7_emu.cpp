// wkv7.cu or wkv7_hip.cpp compiled for the CPU with wkv7_emu.h: a shared library for tests/test_wkv7_emu.py.
//   g++ -std=c++20 -O2 -fPIC -shared -pthread -DWKV7_SRC='"path/to/wkv7.cu"' wkv7_emu.cpp -o libwkv7emu.so
#define WKV7_EMU
#define WKV7_NO_TORCH
#include "wkv7_emu.h"
#include WKV7_SRC
using wkv7::bf16;
extern "C" int emu_chunk_len() { return wkv7::LB; }  // the spacing of the saved states
static wkv7::Args args(int T, int H, const uint16_t* r, const uint16_t* w, const uint16_t* k, const uint16_t* v,
                       const uint16_t* a, const uint16_t* b) {
  auto c = [](const uint16_t* x) { return reinterpret_cast<const bf16*>(x); };
  return wkv7::Args{c(r), c(w), c(k), c(v), c(a), c(b), T, H};
}
extern "C" void emu_forward(int B, int T, int H, int nv, const uint16_t* r, const uint16_t* w, const uint16_t* k,
                            const uint16_t* v, const uint16_t* a, const uint16_t* b, const float* s0, uint16_t* y,
                            float* sT, float* ckpt) {
  const wkv7::Args p = args(T, H, r, w, k, v, a, b);
  const unsigned blocks = B * H * (wkv7::N / nv);
  bf16* yb = reinterpret_cast<bf16*>(y);
  if (nv == 64) emu_launch(blocks, wkv7::NT, [&] { wkv7::wkv7_forward<64>(p, s0, yb, sT, ckpt); });
  if (nv == 32) emu_launch(blocks, wkv7::NT, [&] { wkv7::wkv7_forward<32>(p, s0, yb, sT, ckpt); });
  if (nv == 16) emu_launch(blocks, wkv7::NT, [&] { wkv7::wkv7_forward<16>(p, s0, yb, sT, ckpt); });
}
extern "C" void emu_backward(int B, int T, int H, int nv, const uint16_t* r, const uint16_t* w, const uint16_t* k,
                             const uint16_t* v, const uint16_t* a, const uint16_t* b, const float* ckpt,
                             const uint16_t* dy, const float* dsT, uint16_t* grads, float* ds0, float* gacc) {
  const wkv7::Args p = args(T, H, r, w, k, v, a, b);
  const unsigned blocks = B * H * (wkv7::N / nv);
  const size_t n = (size_t)B * T * H * wkv7::N;
  bf16* g = reinterpret_cast<bf16*>(grads);  // dr, dw, dk, dv, da, db one after another
  const bf16* dyb = reinterpret_cast<const bf16*>(dy);
  auto run = [&](auto kernel) {
    emu_launch(blocks, wkv7::NT_BWD, [&] {
      kernel(p, ckpt, dyb, dsT, g, g + n, g + 2 * n, g + 3 * n, g + 4 * n, g + 5 * n, ds0, nv < wkv7::N ? gacc : nullptr);
    });
  };
  if (nv == 64) run(wkv7::wkv7_backward<64>);
  if (nv == 32) run(wkv7::wkv7_backward<32>);
  if (nv == 16) run(wkv7::wkv7_backward<16>);
}
