"""The caching-allocator model on hand-computed cases, each citing the rule of
c10/cuda/CUDACachingAllocator.cpp (torch 2.15) it checks. Every figure is exact to the byte."""

from __future__ import annotations

import time

import pytest

from memtui.engine.allocator import FREE, CachingAllocator, OutOfMemory, parse_alloc_conf, replay
from memtui.engine.allocator.caching import roundup_power2_next_division
from memtui.engine.errors import InputError

MiB = 1 << 20


def allocator(conf: str = "", **kwargs) -> CachingAllocator:
    return CachingAllocator(parse_alloc_conf(conf), **kwargs)


def free_sizes(pool) -> list[int]:
    return [size for _stream, size, _ptr, _block in pool.blocks]


# ---- sizes ---------------------------------------------------------------------------------------------
def test_round_size_to_512_bytes():
    # round_size: below kMinBlockSize -> kMinBlockSize, else up to a multiple of kMinBlockSize (512)
    model = allocator()
    assert [model.round_size(n) for n in (1, 511, 512, 513, 1200)] == [512, 512, 512, 1024, 1536]


def test_segment_sizes_by_request():
    # get_allocation_size: <= kSmallSize (1 MiB) -> kSmallBuffer (2 MiB); < kMinLargeAlloc (10 MiB) ->
    # large_segment_size (kLargeBuffer, 20 MiB); else rounded up to kRoundLarge (2 MiB)
    model = allocator()
    assert model.allocation_size(MiB) == 2 * MiB
    assert model.allocation_size(MiB + 512) == 20 * MiB
    assert model.allocation_size(10 * MiB - 512) == 20 * MiB
    assert model.allocation_size(10 * MiB) == 10 * MiB
    assert model.allocation_size(11 * MiB + 512) == 12 * MiB


def test_small_pool_packs_one_mib_blocks_into_2_mib_segments():
    # get_pool: size <= kSmallSize goes to small_blocks; should_split in the small pool: remainder >= 512
    model = allocator()
    model.malloc(MiB)
    model.malloc(MiB)
    assert model.reserved == 2 * MiB and model.segments == 1
    model.malloc(1)  # the 2 MiB segment is full: a new kSmallBuffer
    assert model.reserved == 4 * MiB and model.allocated == 2 * MiB + 512


def test_medium_requests_share_a_20_mib_segment():
    # get_allocation_size: 1-10 MiB requests cudaMalloc kLargeBuffer and split it (remainder > kSmallSize)
    model = allocator()
    for _ in range(4):
        model.malloc(5 * MiB)  # the fourth takes the last 5 MiB exactly
    assert model.reserved == 20 * MiB and model.segments == 1
    model.malloc(5 * MiB)
    assert model.reserved == 40 * MiB and model.segments == 2


def test_a_remainder_of_one_mib_or_less_is_not_split():
    # should_split (large pool): remaining > kSmallSize; 15 MiB -> a 16 MiB segment, 1 MiB left: unsplit,
    # and allocated_bytes counts the whole block (alloc_found_block adds block->size)
    model = allocator()
    block = model.malloc(15 * MiB)
    assert block.size == 16 * MiB and model.allocated == 16 * MiB and model.large.blocks == []


def test_reuse_is_best_fit_and_splits_the_rest():
    # get_free_block: lower_bound on (stream, size, ptr): the smallest cached block that fits
    model = allocator()
    small = model.malloc(12 * MiB)
    large = model.malloc(14 * MiB)
    model.free(small)
    model.free(large)
    again = model.malloc(11 * MiB)  # 11 MiB fits both; best fit is the 12 MiB block, 1 MiB left unsplit
    assert again.ptr == small.ptr and again.size == 12 * MiB
    assert model.reserved == 26 * MiB
    # a 5 MiB request splits the 14 MiB block: 9 MiB stays cached (remaining > kSmallSize)
    model.malloc(5 * MiB)
    assert free_sizes(model.large) == [9 * MiB] and model.reserved == 26 * MiB


def test_a_free_block_merges_with_free_neighbours():
    # free_block -> try_merge_blocks with prev and next of the same segment
    model = allocator()
    first, middle, _third = (model.malloc(5 * MiB) for _ in range(3))
    model.free(middle)
    model.free(first)
    assert sorted(free_sizes(model.large)) == [5 * MiB, 10 * MiB]
    model.malloc(10 * MiB)  # the merged 10 MiB block, no new segment
    assert model.reserved == 20 * MiB and free_sizes(model.large) == [5 * MiB]


def test_a_split_remainder_of_an_earlier_request_serves_a_larger_one():
    # best fit over blocks split from a 20 MiB segment: 12 MiB + 512 fits in the 15 MiB remainder
    model = allocator()
    model.malloc(1000)
    five = model.malloc(5 * MiB)
    model.malloc(12 * MiB + 1)
    assert model.reserved == 22 * MiB and free_sizes(model.large) == [3 * MiB - 512]
    model.free(five)
    model.malloc(15 * MiB)  # no cached block of 15 MiB: a 16 MiB segment
    assert model.reserved == 38 * MiB


# ---- max_split_size_mb --------------------------------------------------------------------------------
def cached_then_requested(conf: str, cached: int, requested: int):
    """A block of `cached` bytes allocated and freed, then a request of `requested`: (model, its block)."""
    model = allocator(conf)
    model.free(model.malloc(cached))
    return model, model.malloc(requested)


def test_oversize_blocks_are_not_split_nor_given_to_small_requests():
    # get_free_block: "Do not return an oversized block for a large request" (size < max_split_size and
    # block >= max_split_size); should_split: size >= max_split_size never splits
    model, _ = cached_then_requested("max_split_size_mb:20", 30 * MiB, 12 * MiB)
    assert model.reserved == 42 * MiB
    model, reused = cached_then_requested("max_split_size_mb:20", 30 * MiB, 25 * MiB)
    assert reused.size == 30 * MiB and model.reserved == 30 * MiB  # 30 < 25 + 20: reused whole


def test_oversize_reuse_is_limited_by_max_non_split_rounding():
    # get_free_block: "Allow oversized block size to be rounded up but within a limit"
    # (block >= size + max_non_split_rounding_size is refused; default = large_segment_size, 20 MiB)
    model, _ = cached_then_requested("max_split_size_mb:20", 100 * MiB, 50 * MiB)
    assert model.reserved == 150 * MiB
    model, _ = cached_then_requested("max_split_size_mb:20,max_non_split_rounding_mb:64", 100 * MiB, 50 * MiB)
    assert model.reserved == 100 * MiB


# ---- out of memory: free cached blocks and retry -------------------------------------------------------
def test_release_available_cached_blocks_frees_an_oversize_block_and_retries():
    # malloc: alloc_block fails -> release_available_cached_blocks (blocks >= max_split_size) -> alloc_block
    model = allocator("max_split_size_mb:20", device_limit=100 * MiB)
    model.free(model.malloc(80 * MiB))
    model.malloc(30 * MiB)  # the 80 MiB block is oversize for it; 80 + 30 > 100: release it, retry
    assert model.reserved == 30 * MiB and model.reserved_peak == 80 * MiB and model.num_alloc_retries == 0


def test_release_available_cached_blocks_frees_the_largest_oversize_blocks_until_enough():
    # release_available_cached_blocks: no single cached block >= the request: release oversize blocks
    # from the largest down until they add up to it (40 MiB, then 30 MiB), then alloc_block again
    model = allocator("max_split_size_mb:20", device_limit=100 * MiB)
    thirty, forty = model.malloc(30 * MiB), model.malloc(40 * MiB)
    model.free(thirty)
    model.free(forty)
    model.malloc(50 * MiB)
    assert model.reserved == 50 * MiB and model.reserved_peak == 70 * MiB and model.num_device_free == 2


def test_release_cached_blocks_frees_every_unsplit_segment_then_retries():
    # malloc: last resort release_cached_blocks (release_blocks: !prev && !next) then alloc_block(isRetry)
    model = allocator(device_limit=40 * MiB)
    model.free(model.malloc(24 * MiB))
    model.malloc(30 * MiB)
    assert model.reserved == 30 * MiB and model.num_alloc_retries == 1


def test_a_split_segment_is_not_released_and_the_request_runs_out_of_memory():
    # release_blocks skips split blocks: the 15 MiB remainder of a live 5 MiB block stays reserved
    model = allocator(device_limit=40 * MiB)
    model.malloc(5 * MiB)
    with pytest.raises(OutOfMemory):
        model.malloc(30 * MiB)
    assert model.reserved == 20 * MiB


def test_garbage_collection_frees_the_oldest_cached_blocks_first():
    # garbage_collect_cached_blocks: past garbage_collection_threshold x allowed memory
    # (setMemoryFraction), free unsplit large blocks whose gc_count >= the average age
    model = allocator("per_process_memory_fraction:1.0,garbage_collection_threshold:0.5", device_total=100 * MiB)
    model.free(model.malloc(40 * MiB))  # cached at get_free_blocks_call_count 1
    model.free(model.malloc(44 * MiB))  # cached at 2; 84 MiB reserved
    model.malloc(50 * MiB)  # count 3: ages 2 and 1, average 1.5: the 40 MiB block goes, 44 + 50 <= 100
    assert model.reserved == 94 * MiB and model.num_alloc_retries == 0
    # without the threshold, the fraction alone: alloc_block refuses, release_cached_blocks frees both
    model = allocator("per_process_memory_fraction:1.0", device_total=100 * MiB)
    model.free(model.malloc(40 * MiB))
    model.free(model.malloc(44 * MiB))
    model.malloc(50 * MiB)
    assert model.reserved == 50 * MiB and model.num_alloc_retries == 1


# ---- roundup_power2_divisions -------------------------------------------------------------------------
def test_roundup_power2_divisions():
    # roundup_power2_next_division: 1200 with 4 divisions of 1024..2048 -> 1280 (the function's comment)
    assert roundup_power2_next_division(1200, 4) == 1280
    assert roundup_power2_next_division(4096, 4) == 4096  # a power of two stays
    # round_size applies it only when size > kMinBlockSize * divisions
    model = allocator("roundup_power2_divisions:4")
    assert model.round_size(1200) == 1536
    assert model.round_size(5 * MiB + 1) == 6 * MiB
    # a list: [MiB boundary:divisions, ..., >:divisions]; the first value also covers the sizes below it
    model = allocator("roundup_power2_divisions:[64:8,256:4,>:1]")
    assert model.round_size(100 * MiB) == 104 * MiB  # 64-128 MiB: 8 divisions of 8 MiB
    assert model.round_size(3 * MiB + 1) == 3 * MiB + 256 * 1024  # 2-4 MiB: 8 divisions of 256 KiB
    assert model.round_size(200 * MiB + 1) == 200 * MiB + 512  # 128-256 MiB: no entry, 512-byte rounding
    assert model.round_size(300 * MiB + 1) == 320 * MiB  # 256-512 MiB: 4 divisions of 64 MiB
    assert model.round_size(600 * MiB + 1) == 600 * MiB + 512  # '>' (512 MiB and up) set 1: no rounding


# ---- expandable segments ------------------------------------------------------------------------------
def test_expandable_segments_map_20_mib_pages_on_demand():
    # try_allocate_expandable_block / map_block: one segment per pool and stream grows by
    # large_segment_size pages; should_split with expandable segments: remainder >= kMinBlockSize
    model = allocator("expandable_segments:True")
    first = model.malloc(5 * MiB)
    assert model.reserved == 20 * MiB and first.size == 5 * MiB
    second = model.malloc(30 * MiB)  # 15 MiB free + one more page, merged (find_expandable_block)
    assert model.reserved == 40 * MiB and second.ptr == first.ptr + 5 * MiB
    model.free(first)
    model.free(second)
    assert model.reserved == 40 * MiB  # freeing keeps the pages mapped
    model.empty_cache()  # release_cached_blocks -> unmap_block -> release_expandable_segment
    assert model.reserved == 0 and model.expandable_segments == []
    # the same two requests without expandable segments: a 20 MiB and a 30 MiB segment
    plain = allocator()
    plain.malloc(5 * MiB)
    plain.malloc(30 * MiB)
    assert plain.reserved == 50 * MiB


def test_expandable_small_pool_maps_2_mib_pages():
    # find_expandable_block: segment_size is kSmallBuffer for the small pool
    model = allocator("expandable_segments:True")
    model.malloc(1000)
    model.malloc(MiB)
    assert model.reserved == 2 * MiB
    model.malloc(MiB)
    assert model.reserved == 4 * MiB


def test_expandable_unmap_keeps_pages_with_live_blocks():
    # unmap_block unmaps only whole free pages; a page holding a live block stays mapped
    model = allocator("expandable_segments:True")
    low = model.malloc(30 * MiB)  # pages 0-1
    high = model.malloc(5 * MiB)  # page 1 (30-35 MiB)
    model.free(low)
    model.empty_cache()  # page 0 (0-20 MiB) is free whole: unmapped; page 1 holds `high`
    assert model.reserved == 20 * MiB
    model.free(high)
    model.empty_cache()
    assert model.reserved == 0


# ---- streams ------------------------------------------------------------------------------------------
def test_a_block_freed_on_one_stream_is_not_reused_on_another():
    # BlockComparatorSize orders by stream first; get_free_block requires (*it)->stream == p.stream()
    model = allocator()
    model.free(model.malloc(5 * MiB, stream=0))
    model.malloc(5 * MiB, stream=1)
    assert model.reserved == 40 * MiB
    model.malloc(5 * MiB, stream=0)
    assert model.reserved == 40 * MiB


# ---- replay -------------------------------------------------------------------------------------------
def test_replay_reports_reserved_and_allocated_peaks():
    events = [("a", 5 * MiB), ("b", 12 * MiB + 1), ("a", FREE), ("c", 15 * MiB), ("b", FREE)]
    result = replay(events)
    assert result.reserved_peak_bytes == 36 * MiB  # 20 MiB (a, then b in its remainder) + 16 MiB (c)
    assert result.allocated_peak_bytes == 12 * MiB + 512 + 16 * MiB
    assert result.reserved_end_bytes == 36 * MiB and result.allocated_end_bytes == 16 * MiB
    assert result.oom_event is None


def test_replay_stops_at_the_out_of_memory_allocation():
    result = replay([("a", 30 * MiB), ("b", 30 * MiB)], device_limit=50 * MiB)
    assert result.oom_event == 1 and result.reserved_peak_bytes == 30 * MiB


def test_replay_of_a_large_step_is_fast():
    # 80 layers x ~600 tensors x 2 steps: the size of a 70B step's trace; target <= 2 s
    events = []
    key = 0
    for _step in range(2):
        live = []
        for layer in range(80):
            for i in range(300):
                size = (1 + (i * 7919 + layer) % 97) * 1_000_003
                events.append((key, size))
                live.append(key)
                key += 1
            for victim in live[-250:]:
                events.append((victim, FREE))
            del live[-250:]
        for victim in live:
            events.append((victim, FREE))
    started = time.perf_counter()
    result = replay(events)
    seconds = time.perf_counter() - started
    assert result.events == len(events) and result.allocated_end_bytes == 0
    assert seconds < 2.0, f"{len(events)} events replayed in {seconds:.2f} s"


# ---- PYTORCH_CUDA_ALLOC_CONF --------------------------------------------------------------------------
def test_alloc_conf_parses_what_torch_parses():
    config = parse_alloc_conf("max_split_size_mb:128, garbage_collection_threshold:0.6,expandable_segments:True,"
                              "roundup_power2_divisions:[256:4,>:2],pinned_use_cuda_host_register:True")
    assert config.max_split_size == 128 * MiB
    assert config.garbage_collection_threshold == 0.6
    assert config.expandable_segments is True
    assert config.max_non_split_rounding_size == 20 * MiB
    assert config.roundup_power2_divisions == (4,) * 9 + (2,) * 7
    big = parse_alloc_conf("large_segment_size_mb:64")
    assert big.large_segment_size == 64 * MiB and big.max_non_split_rounding_size == 64 * MiB


@pytest.mark.parametrize(("conf", "named", "allowed"), [
    ("max_split_size_mb:10", "max_split_size_mb", ">= 20"),
    ("max_split_size_mb:big", "max_split_size_mb", ">= 20"),
    ("large_segment_size_mb:64,max_split_size_mb:32", "max_split_size_mb", ">= 64"),
    ("expandable_segments:yes", "expandable_segments", "True, False"),
    ("garbage_collection_threshold:1.5", "garbage_collection_threshold", "(0.0, 1.0)"),
    ("roundup_power2_divisions:3", "roundup_power2_divisions", "power of two"),
    ("roundup_power2_divisions:[100:4]", "roundup_power2_divisions", "power of two number of MiB"),
    ("frobnicate:1", "frobnicate", "max_split_size_mb"),
    ("backend:cudaMallocAsync", "cudaMallocAsync", "native"),
])
def test_bad_alloc_conf_is_one_line_naming_the_key_and_the_allowed_values(conf, named, allowed):
    with pytest.raises(InputError) as error:
        parse_alloc_conf(conf)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--alloc-conf")
    assert named in message and allowed in message
