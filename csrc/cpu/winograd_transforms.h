// The F(2x2, 3x3) input and output transforms of csrc/cpu/winograd_conv_kernel.cpp. That
// file includes this one twice, inside two namespaces: once for any x86-64 and once
// compiled for AVX-512 (picked at run time), because the extension is built for the
// baseline ISA and these loops over channels are where vector width pays.
// No include guard, no includes: only inside those namespaces.

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <class T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
// Round to nearest even, NaN to the quiet NaN: c10::BFloat16's own rounding, written here
// so that it compiles for this namespace's ISA.
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t r = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + (((u >> 16) & 1) + 0x7FFFu)) >> 16);
  return c10::BFloat16(r, c10::BFloat16::from_bits());
}

// Input transform of one tile for channels [0, C): V[p][c] (stride ldv between p).
// rows[i][j] point at the channel vector of input pixel (y0 + i, x0 + j), or at zeros.
template <class T, class A>
inline void input_transform(const T* const rows[4][4], int64_t c, A* v, int64_t ldv) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) {
    float d[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) d[i][j] = to_float(rows[i][j][k]);
    float r[4][4];  // B^T d, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    for (int j = 0; j < 4; ++j) {
      r[0][j] = d[0][j] - d[2][j];
      r[1][j] = d[1][j] + d[2][j];
      r[2][j] = d[2][j] - d[1][j];
      r[3][j] = d[1][j] - d[3][j];
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B
      v[(i * 4 + 0) * ldv + k] = from_float<A>(r[i][0] - r[i][2]);
      v[(i * 4 + 1) * ldv + k] = from_float<A>(r[i][1] + r[i][2]);
      v[(i * 4 + 2) * ldv + k] = from_float<A>(r[i][2] - r[i][1]);
      v[(i * 4 + 3) * ldv + k] = from_float<A>(r[i][1] - r[i][3]);
    }
  }
}

// Output transform of one tile for `ob` channels: out[a][b] = (A^T M A)[a][b] + bias,
// A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]; m[p] at stride ldm between p.
template <class T>
inline void output_transform(const float* m, int64_t ldm, const float* bias, int64_t ob, T* const out[2][2]) {
#pragma omp simd
  for (int64_t k = 0; k < ob; ++k) {
    float s[2][4];
    for (int j = 0; j < 4; ++j) {
      const float m0 = m[(0 * 4 + j) * ldm + k], m1 = m[(1 * 4 + j) * ldm + k];
      const float m2 = m[(2 * 4 + j) * ldm + k], m3 = m[(3 * 4 + j) * ldm + k];
      s[0][j] = m0 + m1 + m2;
      s[1][j] = m1 - m2 - m3;
    }
    const float b = bias ? bias[k] : 0.0f;
    for (int a = 0; a < 2; ++a) {
      out[a][0][k] = from_float<T>(s[a][0] + s[a][1] + s[a][2] + b);
      out[a][1][k] = from_float<T>(s[a][1] - s[a][2] - s[a][3] + b);
    }
  }
}
