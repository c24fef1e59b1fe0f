"""A pure-Python model of PyTorch's CUDA caching allocator (DeviceCachingAllocator), torch 2.15.

Read from c10/cuda/CUDACachingAllocator.cpp (the revision the source index holds, older than 2.15: the
2.15 tree itself was too large to fetch) and from the newer templated c10/core/CachingDeviceAllocator.h,
whose configuration is AcceleratorAllocatorConfig as in the headers torch 2.15 installs
(torch/include/c10/core/AllocatorConfig.h). Where they differ the newer wins: max_non_split_rounding_size
in get_free_block, large_segment_size for 1-10 MiB requests, release_available_cached_blocks and the
garbage collector skipping expandable segments. Function names below are the allocator's: round_size,
get_pool, get_allocation_size, get_free_block, should_split, alloc_found_block, alloc_block,
free_block / try_merge_blocks, release_available_cached_blocks, release_cached_blocks,
garbage_collect_cached_blocks and the expandable segments (find_expandable_block,
try_allocate_expandable_block, map_block, unmap_block).

What it does not model: CUDA graph private pools and MemPools, record_stream's cross-stream events (a block
is freed when the program frees it), and the free-memory callbacks. Streams are keys of the pools, as in
the allocator, but memtui's traces have one stream. Addresses are virtual: each cudaMalloc'd segment
gets a fresh, increasing address, which decides ties between free blocks of equal size the way
ascending cudaMalloc addresses do; the real driver may hand out other addresses.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from memtui.engine.allocator.config import (
    DEFAULT_CONFIG,
    K_MIN_BLOCK_SIZE,
    K_MIN_LARGE_ALLOC,
    K_ROUND_LARGE,
    K_SMALL_BUFFER,
    K_SMALL_SIZE,
    AllocatorConfig,
)

_SEGMENT_ALIGN = 1 << 21  # cudaMalloc'd segments start 2 MiB apart at least, as on the device
_EXPANDABLE_BASE = 1 << 46  # expandable segments reserve their virtual ranges above the cudaMalloc ones


class OutOfMemory(Exception):
    """malloc found no block and could not get a segment, after freeing the cache (the OOM error)."""

    def __init__(self, size: int, alloc_size: int, reserved: int, allocated: int) -> None:
        self.size = size
        self.alloc_size = alloc_size
        self.reserved = reserved
        self.allocated = allocated
        super().__init__(f"out of memory allocating {size} bytes (segment {alloc_size}); reserved {reserved}, "
                         f"allocated {allocated}")


class Pool:
    """BlockPool: free blocks ordered by (stream, size, address) and, for expandable segments, the unmapped
    ranges ordered by (stream, address)."""

    __slots__ = ("is_small", "blocks", "unmapped", "free_calls")

    def __init__(self, is_small: bool) -> None:
        self.is_small = is_small
        self.blocks: list[tuple[int, int, int, Block]] = []  # BlockComparatorSize
        self.unmapped: list[tuple[int, int, Block]] = []  # BlockComparatorAddress
        self.free_calls = 0  # get_free_blocks_call_count

    def insert(self, block: Block) -> None:  # insert_into_blocks
        block.gc_base = self.free_calls
        insort(self.blocks, (block.stream, block.size, block.ptr, block))

    def erase(self, block: Block) -> None:
        index = bisect_left(self.blocks, (block.stream, block.size, block.ptr))
        assert self.blocks[index][3] is block
        del self.blocks[index]

    def insert_unmapped(self, block: Block) -> None:
        insort(self.unmapped, (block.stream, block.ptr, block))

    def erase_unmapped(self, block: Block) -> None:
        index = bisect_left(self.unmapped, (block.stream, block.ptr))
        assert self.unmapped[index][2] is block
        del self.unmapped[index]


class ExpandableSegment:
    """Reserved virtual range mapped page by page (segment_size: 2 MiB small pool, large_segment_size)."""

    __slots__ = ("base", "page", "pages", "mapped")

    def __init__(self, base: int, page: int, pages: int) -> None:
        self.base = base
        self.page = page
        self.pages = pages
        self.mapped = [False] * pages

    @property
    def size(self) -> int:
        return self.page * self.pages


class Block:
    __slots__ = ("ptr", "size", "requested", "stream", "pool", "prev", "next", "allocated", "mapped",
                 "segment", "gc_base")

    def __init__(self, ptr: int, size: int, stream: int, pool: Pool, segment: ExpandableSegment | None = None) -> None:
        self.ptr = ptr
        self.size = size
        self.requested = 0
        self.stream = stream
        self.pool = pool
        self.prev: Block | None = None
        self.next: Block | None = None
        self.allocated = False
        self.mapped = True
        self.segment = segment
        self.gc_base = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def splice(self, before: Block | None, after: Block | None) -> None:
        if before is not None:
            before.next = self
        self.prev = before
        if after is not None:
            after.prev = self
        self.next = after


class CachingAllocator:
    """One device's allocator. `device_limit` is what cudaMalloc can get in all (None: unlimited);
    `device_total` sizes expandable segments' virtual ranges and per_process_memory_fraction."""

    def __init__(self, config: AllocatorConfig = DEFAULT_CONFIG, *, device_limit: int | None = None,
                 device_total: int = 80 << 30) -> None:
        self.config = config
        self.device_limit = device_limit
        self.device_total = device_total
        self.small = Pool(True)
        self.large = Pool(False)
        self.reserved = 0  # stats.reserved_bytes (== total_allocated_memory)
        self.reserved_peak = 0
        self.allocated = 0  # stats.allocated_bytes
        self.allocated_peak = 0
        self.segments = 0
        self.num_alloc_retries = 0
        self.num_device_alloc = 0
        self.num_device_free = 0
        self._next_address = _SEGMENT_ALIGN
        self._next_expandable = _EXPANDABLE_BASE
        self.expandable_segments: list[ExpandableSegment] = []
        self.set_fraction = config.per_process_memory_fraction is not None
        self.allowed_maximum = int((config.per_process_memory_fraction or 0.0) * device_total)

    # ---- sizes -----------------------------------------------------------------------------------------
    def round_size(self, size: int) -> int:
        """round_size: at least kMinBlockSize, a multiple of it, or the next power-of-two division."""
        if size < K_MIN_BLOCK_SIZE:
            return K_MIN_BLOCK_SIZE
        divisions = self.config.divisions_for(size)
        if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
            return roundup_power2_next_division(size, divisions)
        return K_MIN_BLOCK_SIZE * ((size + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)

    def allocation_size(self, size: int) -> int:
        """get_allocation_size: the segment a new request of `size` (rounded) makes."""
        if size <= K_SMALL_SIZE:
            return K_SMALL_BUFFER
        if size < K_MIN_LARGE_ALLOC:
            return self.config.large_segment_size
        return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)

    # ---- malloc / free ---------------------------------------------------------------------------------
    def malloc(self, orig_size: int, stream: int = 0) -> Block:
        size = self.round_size(orig_size)
        pool = self.small if size <= K_SMALL_SIZE else self.large  # get_pool
        alloc_size = self.allocation_size(size)
        block = self._get_free_block(pool, size, stream)
        if block is None:
            if self.set_fraction and self.config.garbage_collection_threshold > 0.0:
                self._garbage_collect()
            block = self._alloc_block(pool, size, alloc_size, stream)
            if block is None and self._release_available_cached_blocks(pool, size, stream):
                block = self._alloc_block(pool, size, alloc_size, stream)
            if block is None:
                self._release_cached_blocks()
                self.num_alloc_retries += 1
                block = self._alloc_block(pool, size, alloc_size, stream)
            if block is None:
                raise OutOfMemory(orig_size, alloc_size, self.reserved, self.allocated)
        return self._alloc_found_block(block, pool, size, orig_size, self._should_split(block, size))

    def free(self, block: Block) -> None:
        """free + free_block: back to its pool, merged with free neighbours of its segment."""
        assert block.allocated
        block.allocated = False
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour)
        block.pool.insert(block)

    def empty_cache(self) -> None:
        self._release_cached_blocks()

    def held_segments(self) -> int:
        """Segments as a snapshot lists them: cudaMalloc'd ones, and each contiguous mapped range."""
        ranges = sum(sum(1 for i, on in enumerate(s.mapped) if on and (i == 0 or not s.mapped[i - 1]))
                     for s in self.expandable_segments)
        return self.segments + ranges

    # ---- finding a cached block ------------------------------------------------------------------------
    def _get_free_block(self, pool: Pool, size: int, stream: int) -> Block | None:
        config = self.config
        if self.set_fraction and config.garbage_collection_threshold > 0.0:
            pool.free_calls += 1  # ages cached blocks for garbage_collect_cached_blocks
        blocks = pool.blocks
        index = bisect_left(blocks, (stream, size, 0))
        if index == len(blocks) or blocks[index][0] != stream:
            return None
        block = blocks[index][3]
        if block.segment is not None:
            if config.expandable_segments:
                # best fit counts what an expandable block can grow into (its unmapped successor)
                while block.segment is not None and index + 1 < len(blocks) and blocks[index + 1][0] == stream \
                        and _expandable_size(blocks[index + 1][3]) < _expandable_size(block):
                    index += 1
                    block = blocks[index][3]
            else:
                index += 1
                while index < len(blocks) and blocks[index][3].segment is not None and blocks[index][0] == stream:
                    index += 1
                if index == len(blocks) or blocks[index][0] != stream:
                    return None
                block = blocks[index][3]
        limit = config.split_limit
        if size < limit and block.size >= limit:
            return None  # "Do not return an oversized block for a large request"
        if size >= limit and block.size >= size + config.max_non_split_rounding_size:
            return None  # "Allow oversized block size to be rounded up but within a limit"
        del blocks[index]
        return block

    def _should_split(self, block: Block, size: int) -> bool:
        remaining = block.size - size
        if block.pool.is_small or self.config.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self.config.split_limit and remaining > K_SMALL_SIZE

    def _alloc_found_block(self, block: Block, pool: Pool, size: int, orig_size: int, split: bool) -> Block:
        if split:
            remaining = block
            block = Block(remaining.ptr, size, remaining.stream, pool, remaining.segment)
            block.splice(remaining.prev, remaining)
            remaining.ptr += size
            remaining.size -= size
            pool.insert(remaining)
        block.allocated = True
        block.requested = orig_size
        self.allocated += block.size
        self.allocated_peak = max(self.allocated_peak, self.allocated)
        return block

    def _try_merge(self, dst: Block, src: Block | None) -> int:
        """try_merge_blocks: absorb a free neighbour that is mapped alike; the bytes absorbed, or 0."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if src.mapped:
            src.pool.erase(src)
        else:
            src.pool.erase_unmapped(src)
        if dst.prev is src:
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    # ---- new segments ----------------------------------------------------------------------------------
    def _can_get(self, n_bytes: int) -> bool:
        return self.device_limit is None or self.reserved + n_bytes <= self.device_limit

    def _grow(self, n_bytes: int) -> None:
        self.reserved += n_bytes
        self.reserved_peak = max(self.reserved_peak, self.reserved)
        self.num_device_alloc += 1

    def _alloc_block(self, pool: Pool, size: int, alloc_size: int, stream: int) -> Block | None:
        """alloc_block: cudaMalloc a segment of alloc_size, or map pages of an expandable segment."""
        if self.set_fraction and self.reserved + alloc_size > self.allowed_maximum:
            return None
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(pool, size, stream)
        if not self._can_get(alloc_size):
            return None
        block = Block(self._next_address, alloc_size, stream, pool)
        self._next_address += (alloc_size + _SEGMENT_ALIGN - 1) // _SEGMENT_ALIGN * _SEGMENT_ALIGN
        self.segments += 1
        self._grow(alloc_size)
        return block

    def _release_block(self, block: Block) -> None:
        """release_block: cudaFree a whole cached segment."""
        assert block.segment is None
        block.pool.erase(block)
        self.reserved -= block.size
        self.segments -= 1
        self.num_device_free += 1

    def _release_available_cached_blocks(self, pool: Pool, size: int, stream: int) -> bool:
        """release_available_cached_blocks: free oversize cached blocks (>= max_split_size), only enough."""
        limit = self.config.split_limit
        if self.config.max_split_size is None:
            return False
        target = max(size, limit)
        blocks = pool.blocks
        index = bisect_left(blocks, (stream, target, 0))
        if index == len(blocks) or blocks[index][0] != stream or blocks[index][3].segment is not None:
            if index == 0:
                return False
            released = 0
            index -= 1  # the largest block of this stream
            while released < target and blocks[index][1] >= limit and blocks[index][0] == stream:
                current = blocks[index][3]
                is_first = index == 0
                index -= 1
                if current.segment is None:
                    released += current.size
                    self._release_block(current)
                if is_first:
                    break
            return released >= target
        self._release_block(blocks[index][3])
        return True

    def _release_cached_blocks(self) -> None:
        """release_cached_blocks: every unsplit cached segment back to CUDA; expandable pages unmapped."""
        for pool in (self.large, self.small):
            to_unmap = []
            for _stream, _size, _ptr, block in list(pool.blocks):
                if block.segment is not None:
                    to_unmap.append(block)
                elif block.prev is None and block.next is None:
                    self._release_block(block)
            for block in to_unmap:
                self._unmap_block(block)
                if block.prev is None and block.next is None and not block.mapped:
                    pool.erase_unmapped(block)
                    self.expandable_segments.remove(block.segment)  # release_expandable_segment

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks: past the threshold, free unsplit large blocks of above-average age."""
        threshold = int(self.config.garbage_collection_threshold * self.allowed_maximum)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        pool = self.large
        freeable = [b for *_, b in pool.blocks if not b.is_split()]
        total_age = sum(pool.free_calls - b.gc_base for b in freeable)
        count = len(freeable)
        if count == 0:
            return
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            age_threshold = total_age / count
            freed = False
            for *_, block in list(pool.blocks):
                age = pool.free_calls - block.gc_base
                if not block.is_split() and block.segment is None and age >= age_threshold:
                    freed = True
                    reclaimed += block.size
                    total_age -= age
                    count -= 1
                    self._release_block(block)

    # ---- expandable segments ---------------------------------------------------------------------------
    def _find_expandable_block(self, pool: Pool, size: int, stream: int) -> Block:
        """find_expandable_block: the lowest address with room (free + unmapped), else a new segment."""
        unmapped = pool.unmapped
        index = bisect_left(unmapped, (stream, 0))
        while index < len(unmapped) and unmapped[index][0] == stream:
            candidate = unmapped[index][2]
            if candidate.prev is not None and not candidate.prev.allocated:
                candidate = candidate.prev
            room, walker = 0, candidate
            while room < size and walker is not None and not walker.allocated:
                room += walker.size
                walker = walker.next
            if room >= size:
                return candidate
            index += 1
        page = K_SMALL_BUFFER if pool.is_small else self.config.large_segment_size
        reserve = self.device_total + self.device_total // 8  # 1 1/8 of the device's memory
        pages = (reserve + page - 1) // page
        segment = ExpandableSegment(self._next_expandable, page, pages)
        self._next_expandable += segment.size + page
        self.expandable_segments.append(segment)
        candidate = Block(segment.base, segment.size, stream, pool, segment)
        candidate.mapped = False
        pool.insert_unmapped(candidate)
        return candidate

    def _map_block(self, block: Block, size: int) -> bool:
        """map_block: back the first pages of an unmapped block with memory; merge with free neighbours."""
        segment = block.segment
        assert segment is not None and not block.mapped
        first = (block.ptr - segment.base) // segment.page
        last = -(-(block.ptr + size - segment.base) // segment.page)
        mapped_bytes = (last - first) * segment.page
        if mapped_bytes == 0 or not self._can_get(mapped_bytes):
            return False  # cuMemCreate failed: the pages created so far are released again
        for page in range(first, last):
            segment.mapped[page] = True
        pool = block.pool
        pool.erase_unmapped(block)
        block.mapped = True
        if mapped_bytes < block.size:
            remaining = Block(block.ptr + mapped_bytes, block.size - mapped_bytes, block.stream, pool, segment)
            remaining.mapped = False
            remaining.splice(block, block.next)
            pool.insert_unmapped(remaining)
            block.size = mapped_bytes
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        pool.insert(block)
        self._grow(mapped_bytes)
        return True

    def _try_allocate_expandable_block(self, pool: Pool, size: int, stream: int) -> Block | None:
        candidate = self._find_expandable_block(pool, size, stream)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            following = candidate.next
            assert following is not None
            if not self._map_block(following, min(size - candidate.size, following.size)):
                return None
            candidate = following
        pool.erase(candidate)
        return candidate

    def _unmap_block(self, block: Block) -> None:
        """unmap_block: give back the whole pages inside a free expandable block."""
        segment = block.segment
        assert segment is not None
        first = -(-(block.ptr - segment.base) // segment.page)
        last = (block.ptr + block.size - segment.base) // segment.page
        if first >= last:
            return
        pool = block.pool
        pool.erase(block)
        start = segment.base + first * segment.page
        unmapped_bytes = (last - first) * segment.page
        before = start - block.ptr
        if before > 0:
            head = Block(block.ptr, before, block.stream, pool, segment)
            head.splice(block.prev, block)
            pool.insert(head)
        after = block.size - before - unmapped_bytes
        if after > 0:
            tail = Block(start + unmapped_bytes, after, block.stream, pool, segment)
            tail.splice(block, block.next)
            pool.insert(tail)
        block.ptr = start
        block.size = unmapped_bytes
        block.mapped = False
        for page in range(first, last):
            segment.mapped[page] = False
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        pool.insert_unmapped(block)
        self.reserved -= unmapped_bytes
        self.num_device_free += 1


def _expandable_size(block: Block) -> int:
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """roundup_power2_next_division: the next of `divisions` equal steps between two powers of two."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded_down = size & ~(step - 1)
    return size if rounded_down == size else rounded_down + step
