// Host-side test of the CUDA backend's launch tables (csrc/cuda/sharpopt_kernels.cu): runs
// on a machine without a GPU, compiled and run by .ci/nvcc_check.sh. It includes the
// kernels' translation unit to reach its internal host code and checks
//   - RowCursor (the per-thread row/column tracker of perturb) against i / L and i % L;
//   - for_tables + find_slot (the table a launch gets and how a block finds its tensor):
//     every (tensor, unit) is visited by exactly one block, in tensor order, with the
//     global partial index the reductions use, and the block reads back that tensor's
//     pointers, numel, row length and row-means pointer; tables are full before a new
//     launch starts;
// and prints the launches per pass for 1200 tensors (the figure the table layout is for).
#include "cuda/sharpopt_kernels.cu"

#include <cinttypes>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

using namespace sharpopt_cuda;

static int failures = 0;
#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      if (++failures <= 20) {                                   \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                               \
        std::printf("\n");                                      \
      }                                                         \
    }                                                           \
  } while (0)

// A fake device pointer naming list k and tensor i (16-byte aligned, never dereferenced).
static const void* fake_ptr(int k, int i) {
  return reinterpret_cast<const void*>((uintptr_t(k + 1) << 40) | (uintptr_t(i) << 4));
}

static void test_row_cursor() {
  const int64_t lens[] = {1, 2, 3, 7, 8, 9, 27, 64, 100, 4097, 65537, 1 << 20};
  const int64_t steps[] = {1, 7, 512, 2048, 4096};
  std::mt19937_64 rng(1);
  for (int64_t L : lens) {
    for (int64_t step : steps) {
      int64_t i = int64_t(rng() % 1000003);
      RowCursor cur;
      cur.init(i, L, step);
      for (int n = 0; n < 300; ++n, i += step) {
        CHECK(cur.r == i / L && cur.c == i % L,
              "L=%" PRId64 " step=%" PRId64 " i=%" PRId64 ": cursor (%" PRId64 ", %" PRId64
              "), expected (%" PRId64 ", %" PRId64 ")",
              L, step, i, cur.r, cur.c, i / L, i % L);
        cur.advance();
      }
    }
  }
}

struct Launched {
  Table tab;
  int nb;
};

// One random tensor list against one table plan.
static void test_tables_once(std::mt19937_64& rng, int n, int nptr, bool rows, bool row_units,
                             int take_mod, int64_t base) {
  std::vector<int64_t> numel(n), row_len(n);
  std::vector<float*> means(n);
  std::vector<std::vector<const void*>> lists(nptr, std::vector<const void*>(n));
  for (int i = 0; i < n; ++i) {
    const int kind = int(rng() % 10);
    numel[i] = kind == 0 ? 0 : kind < 6 ? int64_t(rng() % 5000) + 1
                                        : int64_t(rng() % (5 * kChunk)) + 1;  // several chunks
    row_len[i] = 0;
    if (numel[i] > 0 && rng() % 3 != 0) {  // a 2-D tensor: rows x L
      const int64_t Ls[] = {1, 3, 9, 16, 100, 4096, 4097, kChunk, kChunk + 5};
      const int64_t L = Ls[rng() % 9];
      const int64_t r = std::max<int64_t>(1, numel[i] / L);
      numel[i] = r * L;
      row_len[i] = L;
    }
    means[i] = rng() % 4 == 0 ? nullptr : reinterpret_cast<float*>((uintptr_t(9) << 40) | (uintptr_t(i) << 4));
    for (int k = 0; k < nptr; ++k) lists[k][i] = fake_ptr(k, i);
  }
  TablePlan pl;
  pl.nptr = nptr;
  for (int k = 0; k < nptr; ++k) pl.lists[k] = lists[k].data();
  pl.rows = rows;
  pl.row_units = row_units;
  auto take = [&](int i) { return take_mod == 0 || i % take_mod != 1; };

  std::vector<Launched> launches;
  const int64_t next = for_tables(pl, n, numel.data(), row_len.data(), means.data(), base, take,
                                  [&](const Table& tab, int nb) { launches.push_back({tab, nb}); });

  // The expected (tensor, unit) sequence, numbered from base.
  std::vector<std::pair<int, int64_t>> want;
  int ntensors = 0;
  for (int i = 0; i < n; ++i) {
    if (!take(i) || numel[i] == 0) continue;
    ++ntensors;
    const int64_t units = units_of(numel[i], row_units ? row_len[i] : 0);
    for (int64_t u = 0; u < units; ++u) want.push_back({i, u});
  }
  CHECK(next == base + int64_t(want.size()), "returned %" PRId64 ", expected %" PRId64, next,
        base + int64_t(want.size()));
  const int nrows = nptr + 1 + (rows ? 2 : 0);
  const int cap = table_capacity(nrows);
  const int expect_launches = (ntensors + cap - 1) / cap;
  CHECK(int(launches.size()) == expect_launches, "%d launches for %d tensors (capacity %d), expected %d",
        int(launches.size()), ntensors, cap, expect_launches);

  int64_t seen = 0;
  for (size_t li = 0; li < launches.size(); ++li) {
    const Table& tab = launches[li].tab;
    CHECK(tab.unit_base == base + seen, "launch %zu starts at unit %" PRId64 ", expected %" PRId64, li,
          tab.unit_base, base + seen);
    CHECK(tab.n >= 1 && tab.n <= cap, "launch %zu holds %d tensors (capacity %d)", li, tab.n, cap);
    CHECK(li + 1 == launches.size() || tab.n == cap, "launch %zu closed with %d of %d slots", li, tab.n, cap);
    CHECK(tab.start_off + (tab.n + 1) / 2 <= Table::kWords, "launch %zu overflows its table", li);
    for (int b = 0; b < launches[li].nb; ++b) {
      const Slot s = find_slot(tab, b);
      const int64_t g = tab.unit_base + b;
      if (g - base >= int64_t(want.size())) {
        CHECK(false, "launch %zu block %d: global unit %" PRId64 " beyond the plan", li, b, g);
        break;
      }
      const int i = want[size_t(g - base)].first;
      const int64_t u = want[size_t(g - base)].second;
      CHECK(s.t >= 0 && s.t < tab.n, "launch %zu block %d: slot %d of %d", li, b, s.t, tab.n);
      for (int k = 0; k < nptr; ++k)
        CHECK(table_ptr<const void>(tab, k, s.t) == fake_ptr(k, i),
              "launch %zu block %d: list %d points at the wrong tensor (want tensor %d)", li, b, k, i);
      CHECK(table_word(tab, nptr, s.t) == numel[i], "launch %zu block %d: numel %" PRId64 ", want %" PRId64,
            li, b, table_word(tab, nptr, s.t), numel[i]);
      CHECK(s.unit == u, "launch %zu block %d (tensor %d): unit %" PRId64 ", want %" PRId64, li, b, i, s.unit, u);
      if (rows) {
        const int64_t L = row_len[i] > 0 ? row_len[i] : 1;
        CHECK(table_word(tab, nptr + 1, s.t) == L, "launch %zu block %d: row length %" PRId64 ", want %" PRId64,
              li, b, table_word(tab, nptr + 1, s.t), L);
        const float* m = row_len[i] > 0 ? means[i] : nullptr;
        CHECK(table_ptr<const float>(tab, nptr + 2, s.t) == m, "launch %zu block %d: wrong row-means pointer",
              li, b);
      }
    }
    seen += launches[li].nb;
  }
  CHECK(seen == int64_t(want.size()), "%" PRId64 " blocks launched, %zu units planned", seen, want.size());
}

static void test_tables() {
  std::mt19937_64 rng(2);
  const int sizes[] = {0, 1, 2, 5, 37, 66, 67, 76, 77, 141, 142, 198, 199, 400, 1200};
  for (int n : sizes) {
    for (int nptr = 1; nptr <= 6; ++nptr) {
      test_tables_once(rng, n, nptr, false, false, 0, 0);
      test_tables_once(rng, n, nptr, false, false, 3, 17);
    }
    for (int nptr = 1; nptr <= 3; ++nptr) {
      test_tables_once(rng, n, nptr, true, false, 0, 0);  // perturb with row means
      test_tables_once(rng, n, nptr, true, true, 2, 5);   // rows kernel after a flat plan
    }
  }
}

// Launches per pass for `n` tensors, before (fixed Table<D>: 2400 / (8 D + 24) tensors, one
// entry per block, 320 blocks) and now (table_capacity of the rows the pass uses).
static void print_launch_counts(int n) {
  struct Pass {
    const char* name;
    int old_d;  // D of the old Table<D>
    int rows;   // table rows per tensor now
  };
  const Pass passes[] = {
      {"sumsq (SAM: g)", 2, 1 + 1},
      {"sumsq (ASAM: g, w)", 2, 2 + 1},
      {"sumsq rows (GCSAM: g, numel, L, means)", 2, 1 + 3},
      {"dot (x, y)", 2, 2 + 1},
      {"perturb (w, saved, g)", 3, 3 + 1},
      {"perturb GCSAM (w, saved, g, L, means)", 3, 3 + 3},
      {"restore (w, saved)", 2, 2 + 1},
      {"lincomb K=2 (x0, x1, out)", 4, 3 + 1},
      {"restore_sgd momentum (w, saved, g, buf)", 4, 4 + 1},
      {"restore_adam (w, saved, g, m, v)", 6, 5 + 1},
      {"restore_adam amsgrad (+ vmax)", 6, 6 + 1},
  };
  std::printf("launches per pass for %d tensors (at most 320 units each before; the tensor count "
              "bounds both)\n", n);
  for (const Pass& p : passes) {
    const int old_cap = 2400 / (8 * p.old_d + 24);
    const int cap = table_capacity(p.rows);
    std::printf("  %-42s before %3d (%3d tensors/launch)  now %3d (%3d tensors/launch)\n", p.name,
                (n + old_cap - 1) / old_cap, old_cap, (n + cap - 1) / cap, cap);
  }
}

int main() {
  test_row_cursor();
  test_tables();
  print_launch_counts(1200);
  if (failures) {
    std::printf("cuda_plan_test: FAILED (%d checks)\n", failures);
    return 1;
  }
  std::printf("cuda_plan_test: ok\n");
  return 0;
}
