// Multi-step IF/LIF neurons: forward and surrogate BPTT, T steps inside one pass over the elements.
// Built and loaded by neuron_kernel.py (ctypes, no torch headers); the semantics are those of the eager
// loop in neurons.py, which the tests compare this against.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#include <omp.h>

namespace {

constexpr int64_t kTile = 256;  // channels whose membranes one thread keeps in cache
enum { kSubtractLeak = 0, kSubtract = 1, kZero = 2 };
enum { kAtan = 0, kSigmoid = 1, kTriangle = 2 };

struct Shape {
  int64_t steps, rows, channels;
  int64_t stride() const { return rows * channels; }  // elements per time step
  int64_t blocks() const { return (channels + kTile - 1) / kTile; }
  int64_t tiles() const { return rows * blocks(); }
};

template <typename T, bool Signed>
inline T fire(T u, T threshold) {
  T s = T(u >= threshold);  // branch-free, so the loops vectorise
  if (Signed) s -= T(u <= -threshold);
  return s;
}

// The eager loop's update of the carried membrane, operation for operation.
template <typename T, int Reset>
inline T carry_after(T u, T s, T threshold, T beta) {
  if (Reset == kZero) return (u * (T(1) - std::abs(s))) * beta;
  if (Reset == kSubtractLeak) return (u - s * threshold) * beta;
  return u * beta - s * threshold;
}

template <typename T, int Surrogate>
inline T surrogate(T z, T a, T half_a, T half_pi_a) {
  if (Surrogate == kAtan) {
    T w = half_pi_a * z;
    return half_a / (T(1) + w * w);
  } else if (Surrogate == kSigmoid) {
    T sig = T(1) / (T(1) + std::exp(-(a * z)));
    return a * sig * (T(1) - sig);
  } else {
    return a * std::max(T(1) - a * std::abs(z), T(0));
  }
}

// One step over a tile's channels: integrate, fire, reset and leak. Writes the spikes, or with
// Membranes the membranes before the spike decision (the backward's recompute).
template <typename T, bool Signed, int Reset, bool Membranes>
void integrate_step(const T* __restrict xt, T* __restrict out, T* __restrict carry, const T* __restrict th,
                    const T* __restrict be, int64_t width) {
  for (int64_t c = 0; c < width; ++c) {
    const T u = carry[c] + xt[c];
    const T s = fire<T, Signed>(u, th[c]);
    out[c] = Membranes ? u : s;
    carry[c] = carry_after<T, Reset>(u, s, th[c], be[c]);
  }
}

template <typename T, bool Signed, int Reset>
void forward(const T* x, T* spikes, const T* threshold, const T* beta, Shape shape, int threads) {
  const int64_t stride = shape.stride(), blocks = shape.blocks(), tiles = shape.tiles();
  const bool parallel = threads > 1 && shape.steps * stride > 32768;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<T> carry(kTile);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t c0 = (tile % blocks) * kTile;
      const int64_t width = std::min(kTile, shape.channels - c0);
      const int64_t offset = (tile / blocks) * shape.channels + c0;
      const T* th = threshold + c0;
      const T* be = beta + c0;
      T* v = carry.data();
      std::fill(v, v + width, T(0));
      for (int64_t t = 0; t < shape.steps; ++t) {
        integrate_step<T, Signed, Reset, false>(x + t * stride + offset, spikes + t * stride + offset, v, th, be,
                                                width);
      }
    }
  }
}

// One step of the BPTT recursion over a tile's channels; Carry is false at the last step (nothing flows back).
template <typename T, bool Signed, int Reset, int Surrogate, bool Carry, bool NeedThreshold, bool NeedBeta>
void bptt_step(const T* __restrict ut, const T* __restrict gs, T* __restrict gx, T* __restrict gc,
               const T* __restrict th, const T* __restrict inv, const T* __restrict be, double* __restrict acc_threshold,
               double* __restrict acc_beta, int64_t width, T a, T half_a, T half_pi_a) {
  for (int64_t c = 0; c < width; ++c) {
    const T u = ut[c];
    const T scaled = u * inv[c];
    T ds = surrogate<T, Surrogate>(scaled - T(1), a, half_a, half_pi_a);
    if (Signed) ds = ds + surrogate<T, Surrogate>(-scaled - T(1), a, half_a, half_pi_a);
    ds = ds * inv[c];
    T gu = gs[c] * ds;
    double dtheta = NeedThreshold ? double(-gu * scaled) : 0.0;
    if (Carry) {
      const T g = gc[c];
      const T s = fire<T, Signed>(u, th[c]);
      if (Reset == kZero) {
        const T kept = T(1) - std::abs(s);
        gu = gu + g * be[c] * kept;
        if (NeedBeta) acc_beta[c] += double(g * u * kept);
      } else {
        gu = gu + g * be[c];
        if (NeedThreshold) {
          T reset_grad = -g * s;
          if (Reset == kSubtractLeak) reset_grad = reset_grad * be[c];
          dtheta += double(reset_grad);
        }
        if (NeedBeta) {
          const T leaked = Reset == kSubtractLeak ? u - th[c] * s : u;
          acc_beta[c] += double(g * leaked);
        }
      }
    }
    if (NeedThreshold) acc_threshold[c] += dtheta;
    gx[c] = gu;
    gc[c] = gu;
  }
}

template <typename T, bool Signed, int Reset, int Surrogate, bool NeedThreshold, bool NeedBeta>
void backward(const T* x, const T* grad_spikes, T* grad_x, const T* threshold, const T* beta,
              double* grad_threshold, double* grad_beta, Shape shape, double sharpness, int threads) {
  const int64_t stride = shape.stride(), blocks = shape.blocks(), tiles = shape.tiles();
  const int64_t channels = shape.channels, steps = shape.steps;
  const T a = T(sharpness), half_a = T(sharpness / 2.0), half_pi_a = T(M_PI * sharpness / 2.0);
  std::vector<T> inverse(channels);
  for (int64_t c = 0; c < channels; ++c) inverse[c] = T(1) / threshold[c];
  const bool parallel = threads > 1 && steps * stride > 32768;
  const int teams = parallel ? threads : 1;
  std::vector<double> partial_threshold(NeedThreshold ? teams * channels : 0, 0.0);
  std::vector<double> partial_beta(NeedBeta ? teams * channels : 0, 0.0);
#pragma omp parallel num_threads(teams) if (parallel)
  {
    const int team = omp_get_thread_num();
    std::vector<T> membranes(steps * kTile), carry(kTile);
    double* acc_threshold = NeedThreshold ? partial_threshold.data() + team * channels : nullptr;
    double* acc_beta = NeedBeta ? partial_beta.data() + team * channels : nullptr;
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t c0 = (tile % blocks) * kTile;
      const int64_t width = std::min(kTile, channels - c0);
      const int64_t offset = (tile / blocks) * channels + c0;
      const T* th = threshold + c0;
      const T* be = beta + c0;
      T* v = carry.data();
      // the forward again, keeping this tile's membranes
      std::fill(v, v + width, T(0));
      for (int64_t t = 0; t < steps; ++t) {
        integrate_step<T, Signed, Reset, true>(x + t * stride + offset, membranes.data() + t * kTile, v, th, be,
                                               width);
      }
      // BPTT; v now holds dL/d carry, flowing back from the next step's membrane
      double* at = NeedThreshold ? acc_threshold + c0 : nullptr;
      double* ab = NeedBeta ? acc_beta + c0 : nullptr;
      for (int64_t t = steps - 1; t >= 0; --t) {
        const T* ut = membranes.data() + t * kTile;
        const T* gs = grad_spikes + t * stride + offset;
        T* gx = grad_x + t * stride + offset;
        if (t == steps - 1)
          bptt_step<T, Signed, Reset, Surrogate, false, NeedThreshold, NeedBeta>(
              ut, gs, gx, v, th, inverse.data() + c0, be, at, ab, width, a, half_a, half_pi_a);
        else
          bptt_step<T, Signed, Reset, Surrogate, true, NeedThreshold, NeedBeta>(
              ut, gs, gx, v, th, inverse.data() + c0, be, at, ab, width, a, half_a, half_pi_a);
      }
    }
  }
  for (int team = 0; team < teams; ++team) {
    for (int64_t c = 0; c < channels; ++c) {
      if (NeedThreshold) grad_threshold[c] += partial_threshold[team * channels + c];
      if (NeedBeta) grad_beta[c] += partial_beta[team * channels + c];
    }
  }
}

template <int I, int N, typename F>
void choose_from(int value, F& f) {
  if constexpr (I < N) {
    if (value == I) f(std::integral_constant<int, I>{});
    else choose_from<I + 1, N>(value, f);
  }
}

// Calls f(std::integral_constant<int, value>{}) for a run-time value in [0, N): one template instance each.
template <int N, typename F>
void choose(int value, F f) { choose_from<0, N>(value, f); }

template <int D>
using Real = std::conditional_t<D == 0, float, double>;

}  // namespace

extern "C" int snn_neuron_forward(int dtype, const void* x, void* spikes, const void* threshold, const void* beta,
                                  int64_t steps, int64_t rows, int64_t channels, int is_signed, int reset,
                                  int threads) {
  if (dtype < 0 || dtype > 1 || is_signed < 0 || is_signed > 1 || reset < 0 || reset > 2) return 1;
  const Shape shape{steps, rows, channels};
  choose<2>(dtype, [&](auto d) {
    using T = Real<decltype(d)::value>;
    choose<2>(is_signed, [&](auto sg) {
      choose<3>(reset, [&](auto r) {
        forward<T, decltype(sg)::value == 1, decltype(r)::value>(
            static_cast<const T*>(x), static_cast<T*>(spikes), static_cast<const T*>(threshold),
            static_cast<const T*>(beta), shape, threads);
      });
    });
  });
  return 0;
}

extern "C" int snn_neuron_backward(int dtype, const void* x, const void* grad_spikes, void* grad_x,
                                   const void* threshold, const void* beta, double* grad_threshold,
                                   double* grad_beta, int64_t steps, int64_t rows, int64_t channels,
                                   int is_signed, int reset, int surrogate_kind, double sharpness, int threads) {
  if (dtype < 0 || dtype > 1 || is_signed < 0 || is_signed > 1 || reset < 0 || reset > 2 || surrogate_kind < 0 ||
      surrogate_kind > 2)
    return 1;
  const Shape shape{steps, rows, channels};
  choose<2>(dtype, [&](auto d) {
    using T = Real<decltype(d)::value>;
    choose<2>(is_signed, [&](auto sg) {
      choose<3>(reset, [&](auto r) {
        choose<3>(surrogate_kind, [&](auto k) {
          choose<4>((grad_threshold != nullptr) + 2 * (grad_beta != nullptr), [&](auto g) {
            constexpr int grads = decltype(g)::value;
            backward<T, decltype(sg)::value == 1, decltype(r)::value, decltype(k)::value, (grads & 1) != 0,
                     (grads & 2) != 0>(
                static_cast<const T*>(x), static_cast<const T*>(grad_spikes), static_cast<T*>(grad_x),
                static_cast<const T*>(threshold), static_cast<const T*>(beta), grad_threshold, grad_beta, shape,
                sharpness, threads);
          });
        });
      });
    });
  });
  return 0;
}
