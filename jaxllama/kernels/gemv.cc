// Matrix-vector products on GGUF-style quantized weights, and the attention of one query per row
// against a KV cache, for XLA:CPU through jax.ffi.
//
// out[m, n] = sum_i x[m, i] * (scale[n, g(i)] * q[n, i] + offset[n, g(i)])
//
// which is x @ W.T for W = scale * q + offset (per group of `group` values along K), computed in
// float32 without ever building W in memory (each vector of W exists only in registers). q is int8 [N, K], or uint8 [N, K / 2] holding 4-bit values
// packed as GGUF packs Q4 blocks: per 32 values, 16 bytes, low nibbles = values 0..15, high
// nibbles = values 16..31; 5-bit values (Q5_0/Q5_1/Q5_K) add `qh` [N, K / 8], their fifth bits
// as GGUF's Q5_0 keeps them: per 32 values a little-endian uint32 whose bit j belongs to value j. Rows of W are shared out among threads (as many as XLA's intra-op pool).
//
// Also: one layer's W in float32 (`JaxllamaDequant`, dequant_body.inc) for products with many rows,
// which XLA multiplies best on a built matrix; the same values as jaxllama's pure-JAX dequantization.
//
// One source, compiled for AVX-512, AVX2 and portable C++ (the *_body.inc files included three times);
// the CPU is asked at load time which to use, so one build runs on any x86-64 (and elsewhere).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <sched.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif

// Code compiled for one instruction set inside a file built for the baseline: GCC's target
// pragmas, clang's attribute pragma (clang ignores `#pragma GCC target`).
#if defined(__clang__)
#define JL_TARGET_BEGIN(features) \
  _Pragma(JL_STR(clang attribute push(__attribute__((target(features))), apply_to = function)))
#define JL_TARGET_END _Pragma("clang attribute pop")
#else
#define JL_TARGET_BEGIN(features) _Pragma("GCC push_options") _Pragma(JL_STR(GCC target(features)))
#define JL_TARGET_END _Pragma("GCC pop_options")
#endif
#define JL_STR(x) #x

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Software prefetch distance in bytes of q. Without it one thread streamed at about half the
// machine's per-thread read bandwidth; 4-16 KiB measured alike (decode, 2-core Xeon).
constexpr int64_t kAhead = 8192;
constexpr int kMaxRows = 8;  // rows of x handled per pass over a row of W (which stays in L1)
constexpr int64_t kSegment = 64;  // groups whose scales are read into float32 buffers at a time
constexpr int64_t kAttendChunk = 256;  // keys per work item of the decode attention
constexpr int64_t kSpinMicros = 200;  // how long idle helper threads stay awake (see Helpers)
constexpr int64_t kAttendAhead = 32;   // cache rows prefetched ahead (8 rows: 7.5 GB/s, 32: 9.3)

// Asks for the `n` values at p ahead of use (prefetches never fault, past the end included).
template <typename S>
inline void prefetch_row(const S* p, int64_t n) {
  for (int64_t byte = 0; byte < n * int64_t(sizeof(S)); byte += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + byte);
}

// An IEEE half (its bits) as a float, exactly (subnormals, infinities and NaN included).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: a normal float
    int e = 113;
    uint32_t m = man;
    while (!(m & 1024)) { m <<= 1; --e; }
    bits = sign | (uint32_t(e) << 23) | ((m & 1023) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Problem {
  const float* x;       // [M, K]
  const uint8_t* q;     // [N, K] int8, or [N, K / 2] packed
  const uint8_t* qh;    // [N, K / 8]: fifth bits of packed 5-bit values (4 bytes per 32), or null
  const void* scale;    // [N, G], float32 or float16 (`half`), or int8 multipliers of scale_d
  const void* offset;   // [N, G] like scale, or null
  float* out;           // [M, N]
  int64_t m, n, k, groups, group;
  bool packed;
  bool half;  // scale and offset are float16 (exactly the values they stand for)
  const uint16_t* scale_d;   // [N, G / super] float16 factors of int8 scales (K-quants), or null
  const uint16_t* offset_d;  // [N, G / super] likewise for int8 offsets
  int64_t super;             // groups per factor (a super-block of 256 values)
};

struct Attend {
  const float* q;       // [B, Kh, G, d]: one query per row
  const float* k;       // [L, B, S, Kh, d]: the layer-stacked cache
  const float* v;       // [L, B, S, Kh, d]
  const int32_t* q_slot;  // [B]: the query's slot (keys after it are not seen)
  const bool* key_ok;   // [B, S]: False at padding
  float* out;           // [B, Kh, G, d]
  int64_t layer, batch, slots, heads_kv, groups, head_dim, window;
  float scale;
  int64_t chunk, chunks;  // keys per work item, and items per row
  float* top;           // [B, chunks, Kh, G]: per chunk, the maximum score of each query
  float* sum;           // [B, chunks, Kh, G]: sum of exp(score - top)
  float* acc;           // [B, chunks, Kh, G, d]: values weighted by exp(score - top)
};

// The output from the chunks' parts: per query, every chunk rescaled to the largest maximum
// (online softmax), then normalised. A query that sees no key gets zeros.
void attend_merge(const Attend& a) {
  const int64_t d = a.head_dim, per_slot = a.heads_kv * a.groups;
  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t j = 0; j < per_slot; ++j) {
      float m = -INFINITY, total = 0.f;
      for (int64_t c = 0; c < a.chunks; ++c) m = std::max(m, a.top[(b * a.chunks + c) * per_slot + j]);
      float* out = a.out + (b * per_slot + j) * d;
      for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
      for (int64_t c = 0; c < a.chunks; ++c) {
        const int64_t part = (b * a.chunks + c) * per_slot + j;
        if (a.sum[part] == 0.f) continue;  // no visible key in this chunk
        const float w = std::exp(a.top[part] - m);
        total += w * a.sum[part];
        for (int64_t i = 0; i < d; ++i) out[i] += w * a.acc[part * d + i];
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t i = 0; i < d; ++i) out[i] *= inv;
    }
}

#if defined(__x86_64__) || defined(__i386__)
JL_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
using V = __m512;
constexpr int L = 16;
inline V zero() { return _mm512_setzero_ps(); }
inline V broadcast(float s) { return _mm512_set1_ps(s); }
inline V loadx(const float* p) { return _mm512_loadu_ps(p); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
inline float value(float s) { return s; }
inline float value(uint16_t h) { return _cvtsh_ss(h); }
inline void storex(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}
inline V weights_i8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline V weights_u4(const uint8_t* p, int64_t high) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtepi32_ps(high ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(15)));
}
inline void unpack32(const uint8_t* p, V* w) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  w[0] = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  w[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
// The 32 weights s * q + o of a packed unit: the 16 values s * j + o (j = 0..15, one FMA each, as
// for q = j) in one register, picked by each 4-bit value (vpermps reads an index's low 4 bits).
inline void packed32(const uint8_t* p, float s, float o, V* w) {
  const V table = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                  _mm512_set1_ps(s), _mm512_set1_ps(o));
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  w[0] = _mm512_permutexvar_ps(v, table);
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}
// A 5-bit unit: the 4-bit values above plus 16 where bit j of `h` is set (value j's fifth bit), as
// weights s * q + o: two 16-entry tables (q = 0..15 and 16..31) that vpermt2ps picks from by 5 bits.
inline void packed32h(const uint8_t* p, uint32_t h, float s, float o, V* w) {
  const V iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const V lo = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(o));
  const V hi = _mm512_fmadd_ps(_mm512_add_ps(iota, _mm512_set1_ps(16.f)), _mm512_set1_ps(s), _mm512_set1_ps(o));
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i sixteen = _mm512_set1_epi32(16);
  const __m512i v0 = _mm512_and_si512(v, _mm512_set1_epi32(15)), v1 = _mm512_srli_epi32(v, 4);
  w[0] = _mm512_permutex2var_ps(lo, _mm512_mask_or_epi32(v0, __mmask16(h & 0xFFFF), v0, sixteen), hi);
  w[1] = _mm512_permutex2var_ps(lo, _mm512_mask_or_epi32(v1, __mmask16(h >> 16), v1, sixteen), hi);
}
// L values' fifth bits, bits first..first+L-1 of h, as 16.0 or 0.0.
inline V high16(uint32_t h, int64_t first) {
  return _mm512_maskz_mov_ps(__mmask16((h >> first) & 0xFFFF), _mm512_set1_ps(16.f));
}
#include "gemv_body.inc"
#include "attend_body.inc"
#include "dequant_body.inc"
}  // namespace avx512
JL_TARGET_END

JL_TARGET_BEGIN("avx2,fma,f16c")
namespace avx2 {
using V = __m256;
constexpr int L = 8;
inline V zero() { return _mm256_setzero_ps(); }
inline V broadcast(float s) { return _mm256_set1_ps(s); }
inline V loadx(const float* p) { return _mm256_loadu_ps(p); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline void storex(float* p, V v) { _mm256_storeu_ps(p, v); }
inline float value(float s) { return s; }
inline float value(uint16_t h) { return _cvtsh_ss(h); }
inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}
inline float hsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V weights_i8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline V weights_u4(const uint8_t* p, int64_t high) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cvtepi32_ps(high ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15)));
}
inline void unpack32(const uint8_t* p, V* w) {
  const __m256i mask = _mm256_set1_epi32(15);
  const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
  w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
  w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
inline void packed32(const uint8_t* p, float s, float o, V* w) {
  unpack32(p, w);
  for (int j = 0; j < 4; ++j) w[j] = fma(w[j], broadcast(s), broadcast(o));
}
// L values' fifth bits, bits first..first+L-1 of h, as 16.0 or 0.0 (each lane tests its own bit).
inline V high16(uint32_t h, int64_t first) {
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int32_t(h >> first)), lane), lane);
  return _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_set1_ps(16.f));
}
// A 5-bit unit: the 4-bit values plus 16 where their bit of `h` is set, as weights s * q + o.
inline void packed32h(const uint8_t* p, uint32_t h, float s, float o, V* w) {
  unpack32(p, w);
  for (int j = 0; j < 4; ++j) w[j] = fma(add(w[j], high16(h, 8 * j)), broadcast(s), broadcast(o));
}
#include "gemv_body.inc"
#include "attend_body.inc"
#include "dequant_body.inc"
}  // namespace avx2
JL_TARGET_END
#endif  // x86

// Portable C++ for any other CPU (one float per "vector"; the compiler may vectorize it). Its
// results differ from the AVX2/AVX-512 paths' in two ways, both within float32 rounding: `fma`
// here is a product then a sum, two roundings (-ffp-contract=off keeps them apart), where the
// vector paths' fused multiply-add rounds once (weights s * q + o, each x * w accumulated, the
// attention's dot products and weighted sums); and each output is one sequential sum, where the
// vector paths sum L lanes (and two chains) and then the lanes. The dequant kernel uses no FMA
// on any path: the float32 matrices it builds are bit for bit the same everywhere.
namespace portable {
using V = float;
constexpr int L = 1;
inline V zero() { return 0.f; }
inline V broadcast(float s) { return s; }
inline V loadx(const float* p) { return *p; }
inline V fma(V a, V b, V c) { return a * b + c; }
inline V add(V a, V b) { return a + b; }
inline V mul(V a, V b) { return a * b; }
inline float hsum(V v) { return v; }
inline void storex(float* p, V v) { *p = v; }
inline float value(float s) { return s; }
inline float value(uint16_t h) { return half_bits_to_float(h); }
inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = half_bits_to_float(h[i]);
}
inline V weights_i8(const uint8_t* p) { return static_cast<float>(static_cast<int8_t>(*p)); }
inline V weights_u4(const uint8_t* p, int64_t high) { return static_cast<float>(high ? *p >> 4 : *p & 15); }
inline void unpack32(const uint8_t* p, V* w) {
  for (int i = 0; i < 16; ++i) {
    w[i] = static_cast<float>(p[i] & 15);
    w[i + 16] = static_cast<float>(p[i] >> 4);
  }
}
inline void packed32(const uint8_t* p, float s, float o, V* w) {
  unpack32(p, w);
  for (int j = 0; j < 32; ++j) w[j] = fma(w[j], s, o);
}
inline V high16(uint32_t h, int64_t first) { return (h >> first) & 1 ? 16.f : 0.f; }
inline void packed32h(const uint8_t* p, uint32_t h, float s, float o, V* w) {
  unpack32(p, w);
  for (int j = 0; j < 32; ++j) w[j] = fma(w[j] + high16(h, j), s, o);
}
#include "gemv_body.inc"
#include "attend_body.inc"
#include "dequant_body.inc"
}  // namespace portable

using RowsRange = void (*)(const Problem&, int64_t, int64_t);
using AttendRange = void (*)(const Attend&, int64_t, int64_t);

struct Path {
  RowsRange rows;
  AttendRange attend;
  RowsRange dequant;
  const char* isa;
};

Path pick() {
  // JAXLLAMA_KERNEL_ISA=avx2|portable forces a narrower path (tests run every path on one machine).
  const char* forced = std::getenv("JAXLLAMA_KERNEL_ISA");
  const std::string isa = forced ? forced : "";
  if (isa == "portable") return {portable::rows_range, portable::attend_range, portable::dequant_range, "portable"};
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  unsigned a = 0, b = 0, c = 0, d = 0;  // F16C from cpuid: clang's __builtin_cpu_supports has no name for it
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  if (isa.empty() && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return {avx512::rows_range, avx512::attend_range, avx512::dequant_range, "avx512"};
  if (avx2) return {avx2::rows_range, avx2::attend_range, avx2::dequant_range, "avx2"};
#endif
  return {portable::rows_range, portable::attend_range, portable::dequant_range, "portable"};
}

const Path chosen = pick();

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// One call's work, `items` split into chunks handed out through an atomic counter to the calling
// thread and to helper threads. The caller takes chunks too, so a call finishes even if no helper
// ever runs; the state is shared, so a helper that starts late finds nothing left.
struct Job {
  std::function<void(int64_t, int64_t)> range;  // does items [begin, end)
  int64_t items, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};
  void work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      range(c * chunk, std::min(items, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helper threads for the decode kernels (gemv, attend), which are called hundreds of times per
// token for 5-60 microseconds each. A task on XLA's pool started too late to help: a sleeping
// thread takes tens of microseconds to wake, so a 576 x 576 product ran as fast on two threads as
// on one. These helpers stay awake, polling for the next job, for kSpinMicros after their last
// one (yielding the core to any other runnable thread meanwhile), then sleep until woken.
class Helpers {
 public:
  explicit Helpers(int64_t count) : pid_(getpid()) {
    try {  // a process out of threads gets fewer helpers (callers then do more of the work)
      for (; count_ < count; ++count_) std::thread([this] { loop(); }).detach();
    } catch (const std::system_error&) {
    }
  }
  int64_t count() const { return count_; }
  pid_t pid() const { return pid_; }
  // Offers `job` to the helpers (a job offered while another caller's is running replaces it for
  // helpers that have not started it: that caller finishes its own chunks).
  void offer(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto idle_since = std::chrono::steady_clock::now();
      for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        relax();
        if ((spins & 63) != 63) continue;
        sched_yield();
        if (std::chrono::steady_clock::now() - idle_since > std::chrono::microseconds(kSpinMicros)) {
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.fetch_add(1, std::memory_order_acq_rel);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = job_;
        seen = generation_.load(std::memory_order_acquire);
      }
      if (job) job->work();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> sleeping_{0};
  int64_t count_ = 0;
  pid_t pid_;
};

// The process's helpers: one fewer than XLA's intra-op threads (the caller is the other), made on
// first use and again in a forked child (which inherits no threads). Never destroyed: detached
// threads may still poll it while the process exits.
Helpers& helpers(int64_t threads) {
  static std::mutex made;
  static std::atomic<Helpers*> current{nullptr};
  Helpers* h = current.load(std::memory_order_acquire);
  if (h && h->pid() == getpid()) return *h;
  std::lock_guard<std::mutex> lock(made);
  h = current.load(std::memory_order_acquire);
  if (!h || h->pid() != getpid()) {
    h = new Helpers(std::max<int64_t>(0, threads - 1));
    current.store(h, std::memory_order_release);
  }
  return *h;
}

std::shared_ptr<Job> make_job(int64_t items, int64_t chunk, std::function<void(int64_t, int64_t)> range) {
  auto job = std::make_shared<Job>();
  job->range = std::move(range);
  job->items = items;
  job->chunk = std::max<int64_t>(1, chunk);
  job->chunks = (items + job->chunk - 1) / job->chunk;
  return job;
}

// Runs `range` over `items` on the calling thread and tasks of XLA's pool: for long calls between
// XLA's own parallel work (the dequantization of a layer for a prompt's matrix product).
void parallel(ffi::ThreadPool& pool, int64_t items, int64_t chunk, std::function<void(int64_t, int64_t)> range) {
  auto job = make_job(items, chunk, std::move(range));
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min(threads, job->chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->chunks) relax();
}

// The same on the calling thread and the awake `Helpers`: for the short, frequent decode calls.
void parallel_hot(ffi::ThreadPool& pool, int64_t items, int64_t chunk, std::function<void(int64_t, int64_t)> range) {
  auto job = make_job(items, chunk, std::move(range));
  Helpers& h = helpers(std::max<int64_t>(1, pool.num_threads()));
  if (h.count() > 0 && job->chunks > 1) h.offer(job);
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->chunks) relax();
}

// One layer of stacked blocks as a Problem (x and out filled in by the caller), or an error.
// q, scale and offset hold every layer ([L, N, ...]); `layer_index` picks one, so that XLA passes
// the stacked arrays as they are instead of copying one layer's slice out for each call.
ffi::Error layer_problem(const char* what, ffi::AnyBuffer& q, ffi::AnyBuffer& qh, ffi::AnyBuffer& scale,
                         ffi::AnyBuffer& scale_d, ffi::AnyBuffer& offset, ffi::AnyBuffer& offset_d,
                         ffi::Buffer<ffi::S32>& layer_index, int64_t k, Problem& prob) {
  const auto qd = q.dimensions(), hd = qh.dimensions(), sd = scale.dimensions(), od = offset.dimensions();
  const std::string name(what);
  if (qd.size() != 3 || hd.size() != 3 || sd.size() != 3 || od.size() != 3)
    return ffi::Error::InvalidArgument(name + ": q, qh, scale and offset must be rank 3");
  const bool packed = q.element_type() == ffi::U8;
  if (!packed && q.element_type() != ffi::S8)
    return ffi::Error::InvalidArgument(name + ": q must be int8 or packed uint8");
  if (k < 0) k = qd[2] * (packed ? 2 : 1);
  const int64_t layers = qd[0], layer = layer_index.typed_data()[0];
  const int64_t n = qd[1], groups = sd[2];
  if (qd[2] * (packed ? 2 : 1) != k || sd[0] != layers || sd[1] != n || groups <= 0 || k % groups ||
      (k / groups) % 16 || (packed && k % 32))
    return ffi::Error::InvalidArgument(name + ": shapes of x, q and scale do not agree");
  const bool has_offset = offset.element_count() != 0;
  if (has_offset && (od[0] != layers || od[1] != n || od[2] != groups))
    return ffi::Error::InvalidArgument(name + ": offset must match scale");
  const bool has_high = qh.element_count() != 0;
  if (has_high && (!packed || k / groups != 32 || qh.element_type() != ffi::U8 || hd[0] != layers || hd[1] != n ||
                   hd[2] != k / 8))
    return ffi::Error::InvalidArgument(name + ": qh must be uint8 [L, N, K / 8] beside packed q in groups of 32");
  if (layer < 0 || layer >= layers) return ffi::Error::InvalidArgument(name + ": layer index out of range");
  const bool half = scale.element_type() == ffi::F16, two = scale.element_type() == ffi::S8;
  if ((!half && !two && scale.element_type() != ffi::F32) || offset.element_type() != scale.element_type())
    return ffi::Error::InvalidArgument(name + ": scale and offset must both be float32, float16 or int8");
  const auto dd = scale_d.dimensions(), ed = offset_d.dimensions();
  const int64_t factors = dd.size() == 3 ? dd[2] : 0;
  if (two != (scale_d.element_count() != 0) || (has_offset && two) != (offset_d.element_count() != 0) ||
      (two && (scale_d.element_type() != ffi::F16 || dd[0] != layers || dd[1] != n || factors <= 0 ||
               groups % factors || (has_offset && (offset_d.element_type() != ffi::F16 || ed.size() != 3 ||
                                                   ed[0] != layers || ed[1] != n || ed[2] != factors)))))
    return ffi::Error::InvalidArgument(name + ": int8 scales (and offsets) need float16 factors [L, N, G / super]");
  const int64_t row_bytes = packed ? k / 2 : k, at = layer * n * groups * (two ? 1 : half ? 2 : 4);
  const int64_t at_d = two ? layer * n * factors : 0;
  prob = Problem{nullptr, static_cast<const uint8_t*>(q.untyped_data()) + layer * n * row_bytes,
                 has_high ? static_cast<const uint8_t*>(qh.untyped_data()) + layer * n * (k / 8) : nullptr,
                 static_cast<const char*>(scale.untyped_data()) + at,
                 has_offset ? static_cast<const char*>(offset.untyped_data()) + at : nullptr,
                 nullptr, 0, n, k, groups, k / groups, packed, half,
                 two ? static_cast<const uint16_t*>(scale_d.untyped_data()) + at_d : nullptr,
                 two && has_offset ? static_cast<const uint16_t*>(offset_d.untyped_data()) + at_d : nullptr,
                 two ? groups / factors : 1};
  return ffi::Error::Success();
}

// Rows of W per work item: at most 64 KiB of weights, and several items per thread to even out the load.
int64_t rows_per_item(const Problem& p, ffi::ThreadPool& pool) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_bytes = p.packed ? p.k / 2 : p.k;
  return std::min<int64_t>((65536 + row_bytes - 1) / row_bytes, (p.n + 4 * threads - 1) / (4 * threads));
}

ffi::Error GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::AnyBuffer qh,
                    ffi::AnyBuffer scale, ffi::AnyBuffer scale_d, ffi::AnyBuffer offset, ffi::AnyBuffer offset_d,
                    ffi::Buffer<ffi::S32> layer_index, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("gemv: x must be rank 2");
  Problem prob;
  if (auto e = layer_problem("gemv", q, qh, scale, scale_d, offset, offset_d, layer_index, xd[1], prob); e.failure()) return e;
  prob.x = x.typed_data();
  prob.out = out->typed_data();
  prob.m = xd[0];
  parallel_hot(pool, prob.n, rows_per_item(prob, pool), [prob](int64_t n0, int64_t n1) { chosen.rows(prob, n0, n1); });
  return ffi::Error::Success();
}

// One layer's W [N, K] in float32 (see dequant_body.inc), for products with many rows of x,
// which XLA's matrix multiplication does best on a built matrix.
ffi::Error DequantImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer qh, ffi::AnyBuffer scale,
                       ffi::AnyBuffer scale_d, ffi::AnyBuffer offset, ffi::AnyBuffer offset_d, ffi::Buffer<ffi::S32> layer_index,
                       ffi::ResultBuffer<ffi::F32> out) {
  Problem prob;
  if (auto e = layer_problem("dequant", q, qh, scale, scale_d, offset, offset_d, layer_index, -1, prob); e.failure()) return e;
  prob.out = out->typed_data();
  parallel(pool, prob.n, rows_per_item(prob, pool), [prob](int64_t n0, int64_t n1) { chosen.dequant(prob, n0, n1); });
  return ffi::Error::Success();
}

ffi::Error AttendImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer_index, ffi::Buffer<ffi::S32> q_slot,
                      ffi::Buffer<ffi::PRED> key_ok, ffi::Buffer<ffi::S32> window, float scale,
                      ffi::ResultBuffer<ffi::F32> out) {
  // q [B, Kh, G, d]; k, v [L, B, S, Kh, d] (every layer's cache, read in place at `layer_index`).
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), okd = key_ok.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || okd.size() != 2)
    return ffi::Error::InvalidArgument("attend: q must be rank 4, k and v rank 5, key_ok rank 2");
  const int64_t b = qd[0], heads = qd[1], d = qd[3], layers = kd[0], slots = kd[2];
  if (kd[1] != b || kd[3] != heads || kd[4] != d || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      vd[3] != kd[3] || vd[4] != kd[4] || okd[0] != b || okd[1] != slots || q_slot.element_count() != b ||
      window.element_count() != 1 || d % 16)
    return ffi::Error::InvalidArgument("attend: shapes of q, k, v, q_slot and key_ok do not agree");
  const int64_t layer = layer_index.typed_data()[0];
  if (layer < 0 || layer >= layers) return ffi::Error::InvalidArgument("attend: layer index out of range");
  // Keys in chunks of kAttendChunk, so that one long row's few heads still share out over the
  // threads; each chunk's partial softmax is merged at the end.
  const int64_t chunks = (slots + kAttendChunk - 1) / kAttendChunk, groups = qd[2];
  // each item fills its own part; the buffer is this calling thread's, kept between calls
  static thread_local std::vector<float> parts;
  const size_t need = static_cast<size_t>(b * heads * chunks * groups * (2 + d));
  if (parts.size() < need) parts.resize(need);
  float* top = parts.data();
  float* sum = top + b * heads * chunks * groups;
  float* acc = sum + b * heads * chunks * groups;
  const Attend job{q.typed_data(), k.typed_data(), v.typed_data(), q_slot.typed_data(), key_ok.typed_data(),
                   out->typed_data(), layer, b, slots, heads, groups, d, window.typed_data()[0], scale,
                   kAttendChunk, chunks, top, sum, acc};
  parallel_hot(pool, b * chunks, 1, [job](int64_t t0, int64_t t1) { chosen.attend(job, t0, t1); });
  attend_merge(job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllamaAttend, AttendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllamaGemv, GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllamaDequant, DequantImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The instruction set this library chose for this CPU ("avx512", "avx2" or "portable").
extern "C" const char* JaxllamaKernelIsa() { return chosen.isa; }
