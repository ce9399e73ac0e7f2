// A cache of large CPU blocks for the fast inference path (solo_fast._cpu.block_cache).
//
// Why: glibc serves a block over its mmap threshold (at most 32 MB) with a fresh mmap and
// unmaps it when it is freed; smaller ones come from a heap whose top it trims back to the
// OS. Every image's activations (a ResNet-50 c2 map at 800x1344 is 69 MB) therefore arrive
// in pages the kernel faults in and zeroes again: 0.2-1.6 M page faults, 0.15-0.5 s per
// SOLO R50 image on 2 Zen 4 cores. mallopt would fix that for the whole process, which is
// the application's choice, not a library's (solo_fast._cpu.keep_freed_memory, the CLI).
//
// What: the first scope (block_cache_enter) installs this allocator as torch's CPU
// allocator, if torch's default one is installed, and it stays installed: oneDNN
// allocates and frees through whatever allocator is current at the time (raw_allocate /
// raw_deallocate), so a pointer must never be freed by another allocator than the one it
// came from. Outside scopes it *is* the default allocator (every request is forwarded to
// it, and its deleter frees what it made). While a scope is open (scopes are counted, so
// concurrent predict calls share one), a request of at least kMinBytes gets a block of its
// size class (1/8 octave) from the idle list if one fits, else a fresh one from
// c10::alloc_cpu (which honours THP_MEM_ALLOC_ENABLE); such a block goes back to the idle
// list when it is freed inside a scope, and to the OS when freed outside (a result the
// caller kept, let go later). The profiler's CPU memory events are reported as the default
// allocator reports them (a block is "freed" when it goes idle).
//
// Bound: the blocks held (in use + idle) never exceed twice the most this cache ever had
// in use at once: a request that misses first frees the least recently freed idle blocks
// until the new block fits under that bound (with the peak itself as the bound, the idle
// sizes rarely matched the next image's requests: 60-70k page faults per SOLOv2 R50 image
// on 2 Zen 5 cores; with twice, none). Repeated images of one size then fault nothing after
// the first; images of changing sizes recycle the cache instead of growing it.
// block_cache_release() (solo_fast.empty_cache()) returns every idle block to the OS.
//
// The cache object is never destroyed: tensors can outlive every static destructor at
// interpreter exit, and their deleters call into it.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <unordered_map>
#include <list>
#include <map>
#include <mutex>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define SOLO_FAST_HAVE_ATFORK 1
#endif
#include <vector>

namespace solo_fast {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 18;  // 256 KiB: below it glibc's heap bins serve well

// The size class of a request: rounded up to 1/8 of its power of two (at most 12.5 % more),
// so that tensors of nearly equal shapes share blocks.
size_t size_class(size_t n) {
  size_t octave = size_t(1) << (63 - __builtin_clzll(static_cast<unsigned long long>(n)));
  size_t step = std::max<size_t>(octave / 8, 4096);
  return (n + step - 1) / step * step;
}

struct Block {
  void* ptr;
  size_t size;
  std::list<Block*>::iterator lru;              // in idle_lru_ while idle
  std::multimap<size_t, Block*>::iterator fit;  // in idle_by_size_ while idle
};

class BlockCache final : public c10::Allocator {
 public:
  // Opens a scope; returns whether this cache serves it (it is the CPU allocator).
  bool enter() {
    std::lock_guard<std::mutex> g(mu_);
    if (!installed_ && c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator()) {
      c10::SetCPUAllocator(this, /*priority=*/0);
      installed_ = c10::GetCPUAllocator() == this;
    }
    scopes_ += 1;
    return c10::GetCPUAllocator() == this;
  }

  void exit() {
    std::lock_guard<std::mutex> g(mu_);
    if (scopes_ > 0) scopes_ -= 1;
  }

  c10::DataPtr allocate(size_t n) override {
    c10::Allocator* base = c10::GetDefaultCPUAllocator();
    if (n < kMinBytes || scopes_ == 0) return base->allocate(n);
    const size_t size = size_class(n);
    std::unique_lock<std::mutex> g(mu_);
    if (scopes_ == 0) {
      g.unlock();
      return base->allocate(n);
    }
    auto it = idle_by_size_.lower_bound(size);
    if (it != idle_by_size_.end() && it->first <= size + size / 4) {
      Block* b = it->second;
      take_idle(b);
      in_use_ += b->size;
      peak_in_use_ = std::max(peak_in_use_, in_use_);
      hits_ += 1;
      g.unlock();
      c10::profiledCPUMemoryReporter().New(b->ptr, b->size);
      return {b->ptr, b->ptr, &BlockCache::deleter, c10::Device(c10::DeviceType::CPU)};
    }
    // A miss: make room under the bound (twice the peak in use), then a fresh block
    // (allocated outside the lock).
    const size_t bound = 2 * std::max(peak_in_use_, in_use_ + size);
    std::vector<Block*> evicted;
    while (!idle_lru_.empty() && in_use_ + idle_ + size > bound) {
      Block* b = idle_lru_.front();
      take_idle(b);
      live_.erase(b->ptr);
      evicted.push_back(b);
    }
    const size_t peak_before = peak_in_use_;
    in_use_ += size;
    peak_in_use_ = std::max(peak_in_use_, in_use_);
    misses_ += 1;
    g.unlock();
    free_blocks(evicted);
    void* ptr = nullptr;
    try {
      ptr = c10::alloc_cpu(size);
    } catch (c10::Error&) {
      {
        std::lock_guard<std::mutex> g2(mu_);
        in_use_ -= size;
        peak_in_use_ = std::max(peak_before, in_use_);
        misses_ -= 1;
      }
      c10::profiledCPUMemoryReporter().OutOfMemory(size);
      throw;
    }
    {
      std::lock_guard<std::mutex> g2(mu_);
      live_.emplace(ptr, new Block{ptr, size, {}, {}});
    }
    c10::profiledCPUMemoryReporter().New(ptr, size);
    return {ptr, ptr, &BlockCache::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  // oneDNN's buffers are freed with this, whichever allocator made them.
  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every idle block; returns the bytes given back.
  int64_t release() {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> g(mu_);
      while (!idle_lru_.empty()) {
        Block* b = idle_lru_.front();
        take_idle(b);
        live_.erase(b->ptr);
        evicted.push_back(b);
      }
      peak_in_use_ = in_use_;
    }
    int64_t freed = 0;
    for (Block* b : evicted) freed += static_cast<int64_t>(b->size);
    free_blocks(evicted);
    return freed;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(in_use_), static_cast<int64_t>(idle_), static_cast<int64_t>(peak_in_use_),
            hits_, misses_, scopes_, installed_ ? 1 : 0};
  }

  static BlockCache& get() {
    static BlockCache* cache = [] {
      auto* c = new BlockCache();  // never destroyed (see the file comment)
#ifdef SOLO_FAST_HAVE_ATFORK
      pthread_atfork(&BlockCache::before_fork, &BlockCache::after_fork_in_parent,
                     &BlockCache::after_fork_in_child);
#endif
      return c;
    }();
    return *cache;
  }

 private:
  // The deleter of every block this cache handed out, and its raw_deleter: a pointer it
  // does not hold came from the default allocator, whose own deleter frees it.
  static void deleter(void* ptr) {
    if (ptr == nullptr) return;
    if (!get().give_back(ptr)) c10::GetDefaultCPUAllocator()->raw_deleter()(ptr);
  }

  // A block freed inside a scope (an activation) goes idle; one freed outside every scope
  // (what predict returned, let go by the caller later) goes back to the OS, so that the
  // cache holds the network's working set, not whatever results a caller once kept.
  bool give_back(void* ptr) {
    Block* gone = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(ptr);
      if (it == live_.end()) return false;
      Block* b = it->second;
      in_use_ -= b->size;
      if (scopes_ > 0) {
        b->lru = idle_lru_.insert(idle_lru_.end(), b);
        b->fit = idle_by_size_.emplace(b->size, b);
        idle_ += b->size;
      } else {
        live_.erase(it);
        gone = b;
      }
    }
    c10::profiledCPUMemoryReporter().Delete(ptr);
    if (gone != nullptr) free_blocks({gone});
    return true;
  }

  // Takes an idle block off both idle lists (the caller holds mu_).
  void take_idle(Block* b) {
    idle_lru_.erase(b->lru);
    idle_by_size_.erase(b->fit);
    idle_ -= b->size;
  }

  // The lock is held across fork(), so the child (a DataLoader worker) inherits consistent
  // lists and a lock it can release; it starts outside every scope. Its idle blocks are
  // its own copies, still usable. (Nothing under the lock calls malloc.)
  static void before_fork() { get().mu_.lock(); }
  static void after_fork_in_parent() { get().mu_.unlock(); }
  static void after_fork_in_child() {
    BlockCache& c = get();
    c.mu_.unlock();
    c.scopes_ = 0;
  }

  static void free_blocks(const std::vector<Block*>& blocks) {
    for (Block* b : blocks) {
      c10::free_cpu(b->ptr);
      delete b;
    }
  }

  std::mutex mu_;
  bool installed_ = false;
  std::atomic<int64_t> scopes_{0};
  size_t in_use_ = 0;
  size_t idle_ = 0;
  size_t peak_in_use_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  std::unordered_map<void*, Block*> live_;      // every block held, in use or idle
  std::list<Block*> idle_lru_;                  // least recently freed first
  std::multimap<size_t, Block*> idle_by_size_;  // best fit
};

bool block_cache_enter() { return BlockCache::get().enter(); }
void block_cache_exit() { BlockCache::get().exit(); }
int64_t block_cache_release() { return BlockCache::get().release(); }
std::vector<int64_t> block_cache_stats() { return BlockCache::get().stats(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(solo_fast, m) {
  // Scoped by the Python context manager solo_fast._cpu.block_cache(); stats are
  // [in_use, idle, peak_in_use (bytes), hits, misses, open scopes, installed].
  m.def("block_cache_enter() -> bool", &block_cache_enter);
  m.def("block_cache_exit() -> ()", &block_cache_exit);
  m.def("block_cache_release() -> int", &block_cache_release);
  m.def("block_cache_stats() -> int[]", &block_cache_stats);
}

}  // namespace cpu
}  // namespace solo_fast
