"""One kernel launch places every byte range of a staged read: the per-range driver calls leave the main thread.

A staged read holds dozens to thousands of byte ranges bound for the parameter arenas. Enqueueing one
``cuMemcpyDtoDAsync`` per range costs the main thread microseconds each, and that thread also runs the
audit and the checks: over a whole load it is the longest stretch of per-range Python. Here a read's
ranges are written, as it is placed, into its rows of one table on the device (source offset within the
read, destination address, bytes, first chunk: four ``uint64`` a range); placing a read is then one
``cuLaunchKernel`` of ``place_ranges`` over its chunks of at most ``CHUNK`` bytes, one thread block a
chunk (it finds its range by a binary search of the first chunks), each copying with the widest access
its source, destination and length allow. Writing a read's rows is one pass of Python's iterators over its
ranges (no tensor operations: their thread pools would fight the reader threads for the cores), and they
travel to the device in one copy ahead of the launch (``readers.Ranges``).

The same module holds ``find_poison``: whether an arena still holds poison after the load, in one read of every
byte (``memory.Arenas.find_poison``), where torch's comparisons write a mask and reduce it in many launches.

The kernels are ``SOURCE`` below, compiled to ``PTX`` by NVRTC 11.8 for ``compute_70`` (Volta and later; the
driver compiles PTX for the GPU it runs on and caches the result): ``python -m nhcheck.load.kernel
LIBNVRTC`` prints it again, and ``tests/test_load.py`` checks the two agree where NVRTC is
installed. Only the CUDA driver (``libcuda``, loaded in every CUDA process) is called: no compiler, no
extension module at run time. Where the driver will not load them (an older driver, no ``libcuda``)
``Kernel.load`` returns the reason instead, and the load places range by range as before
(``readers.apply_placement``; ``readers.STATS["kernel"]`` is 0 for that load) and scans with torch.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, NamedTuple

#: Bytes one thread block copies at most: a 64 MB read is a thousand blocks, enough for every SM.
CHUNK = 64 << 10
#: Threads per block (each copies 16 bytes a step where the row allows).
THREADS = 256
#: Thread blocks of a poison scan at most (each thread then strides over the arena 16 bytes at a time).
SCAN_BLOCKS = 1024

SOURCE = r"""// Table row r of a staged read: (source offset in the read, destination address, bytes, first chunk).
// Thread block b copies chunk b - first of the row with the last first chunk <= b: at most `chunk` bytes,
// with the widest access its source, destination and length allow.
template <typename T>
__device__ __forceinline__ void copy_as(const unsigned char* s, unsigned char* d, unsigned long long n)
{
    const T* src = reinterpret_cast<const T*>(s);
    T* dst = reinterpret_cast<T*>(d);
    for (unsigned long long i = threadIdx.x; i < n / sizeof(T); i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void place_ranges(
    const unsigned long long* __restrict__ table, unsigned int rows, const unsigned char* __restrict__ base,
    unsigned long long chunk)
{
    const unsigned long long b = blockIdx.x;
    unsigned int lo = 0, hi = rows - 1;
    while (lo < hi) {
        const unsigned int mid = (lo + hi + 1) / 2;
        if (table[4ull * mid + 3] <= b) lo = mid;
        else hi = mid - 1;
    }
    const unsigned long long* row = table + 4ull * lo;
    const unsigned long long off = (b - row[3]) * chunk;
    const unsigned long long left = row[2] - off;
    const unsigned long long n = left < chunk ? left : chunk;
    const unsigned char* s = base + row[0] + off;
    unsigned char* d = reinterpret_cast<unsigned char*>(row[1] + off);
    const unsigned long long a = reinterpret_cast<unsigned long long>(s) | reinterpret_cast<unsigned long long>(d) | n;
    if ((a & 15) == 0) copy_as<uint4>(s, d, n);
    else if ((a & 7) == 0) copy_as<unsigned long long>(s, d, n);
    else if ((a & 3) == 0) copy_as<unsigned int>(s, d, n);
    else if ((a & 1) == 0) copy_as<unsigned short>(s, d, n);
    else copy_as<unsigned char>(s, d, n);
}

// Whether a word holds a lane of `lane` bytes (1, 2, 4 or 8) whose bits are all set: a zero lane of its complement,
// found by the zero-lane test (y - low) & ~y & high, exact for whether any lane is zero.
__device__ __forceinline__ bool all_ones_lane(unsigned long long x, unsigned int lane)
{
    const unsigned long long y = ~x;
    if (lane == 8) return y == 0;
    const unsigned long long low = lane == 1 ? 0x0101010101010101ull : lane == 2 ? 0x0001000100010001ull
                                                                                 : 0x0000000100000001ull;
    return ((y - low) & ~y & (low << (8 * lane - 1))) != 0;
}

// Sets *hit when the `bytes` bytes at `p` (16-byte aligned) hold poison: an element of `lane` bytes (1, 2, 4, 8)
// with every bit set, or where `lane` is 16, a 16-byte run (from `p`) of 0xFF. One read of every byte.
extern "C" __global__ void find_poison(
    const unsigned char* __restrict__ p, unsigned long long bytes, unsigned int lane, unsigned int* __restrict__ hit)
{
    const uint4* w = reinterpret_cast<const uint4*>(p);
    const unsigned long long n = bytes / 16;
    bool found = false;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const uint4 v = w[i];
        const unsigned long long a = ((unsigned long long)v.y << 32) | v.x;
        const unsigned long long b = ((unsigned long long)v.w << 32) | v.z;
        found |= lane == 16 ? (a & b) == ~0ull : all_ones_lane(a, lane) || all_ones_lane(b, lane);
    }
    if (lane < 16 && blockIdx.x == 0 && threadIdx.x == 0) {  // the elements after the last whole 16 bytes
        for (unsigned long long t = n * 16; t + lane <= bytes; t += lane) {
            bool ones = true;
            for (unsigned int k = 0; k < lane; ++k) ones &= p[t + k] == 0xFF;
            found |= ones;
        }
    }
    if (found) *hit = 1;
}
"""

#: ``SOURCE`` compiled by NVRTC 11.8 (``--gpu-architecture=compute_70 -default-device``).
PTX = r"""//
// Generated by NVIDIA NVVM Compiler
//
// Compiler Build ID: CL-31833905
// Cuda compilation tools, release 11.8, V11.8.89
// Based on NVVM 7.0.1
//

.version 7.8
.target sm_70
.address_size 64

	// .globl	place_ranges

.visible .entry place_ranges(
	.param .u64 place_ranges_param_0,
	.param .u32 place_ranges_param_1,
	.param .u64 place_ranges_param_2,
	.param .u64 place_ranges_param_3
)
{
	.reg .pred 	%p<21>;
	.reg .b16 	%rs<3>;
	.reg .b32 	%r<30>;
	.reg .b64 	%rd<75>;


	ld.param.u64 	%rd32, [place_ranges_param_0];
	ld.param.u32 	%r6, [place_ranges_param_1];
	ld.param.u64 	%rd29, [place_ranges_param_2];
	ld.param.u64 	%rd30, [place_ranges_param_3];
	cvta.to.global.u64 	%rd1, %rd32;
	mov.u32 	%r7, %ctaid.x;
	cvt.u64.u32 	%rd2, %r7;
	add.s32 	%r28, %r6, -1;
	setp.eq.s32 	%p1, %r28, 0;
	mov.u64 	%rd69, 0;
	@%p1 bra 	$L__BB0_4;

	mov.u32 	%r29, 0;

$L__BB0_2:
	add.s32 	%r9, %r29, %r28;
	add.s32 	%r10, %r9, 1;
	shr.u32 	%r11, %r10, 1;
	mul.wide.u32 	%rd33, %r11, 4;
	shl.b64 	%rd34, %rd33, 3;
	add.s64 	%rd35, %rd1, %rd34;
	ld.global.nc.u64 	%rd36, [%rd35+24];
	setp.le.u64 	%p2, %rd36, %rd2;
	add.s32 	%r12, %r11, -1;
	selp.b32 	%r29, %r11, %r29, %p2;
	selp.b32 	%r28, %r28, %r12, %p2;
	setp.lt.u32 	%p3, %r29, %r28;
	@%p3 bra 	$L__BB0_2;

	mul.wide.u32 	%rd69, %r29, 4;

$L__BB0_4:
	shl.b64 	%rd37, %rd69, 3;
	add.s64 	%rd38, %rd1, %rd37;
	ld.global.nc.u64 	%rd39, [%rd38+24];
	sub.s64 	%rd40, %rd2, %rd39;
	mul.lo.s64 	%rd41, %rd40, %rd30;
	ld.global.nc.u64 	%rd42, [%rd38+16];
	sub.s64 	%rd43, %rd42, %rd41;
	min.u64 	%rd5, %rd43, %rd30;
	ld.global.nc.u64 	%rd44, [%rd38];
	add.s64 	%rd45, %rd44, %rd41;
	cvta.to.global.u64 	%rd46, %rd29;
	add.s64 	%rd6, %rd46, %rd45;
	add.s64 	%rd47, %rd29, %rd45;
	ld.global.nc.u64 	%rd48, [%rd38+8];
	add.s64 	%rd7, %rd48, %rd41;
	or.b64  	%rd49, %rd7, %rd47;
	or.b64  	%rd8, %rd49, %rd5;
	and.b64  	%rd50, %rd8, 15;
	setp.eq.s64 	%p4, %rd50, 0;
	mov.u32 	%r13, %tid.x;
	cvt.u64.u32 	%rd9, %r13;
	@%p4 bra 	$L__BB0_20;

	and.b64  	%rd51, %rd8, 7;
	setp.eq.s64 	%p5, %rd51, 0;
	@%p5 bra 	$L__BB0_17;

	and.b64  	%rd52, %rd8, 3;
	setp.eq.s64 	%p6, %rd52, 0;
	@%p6 bra 	$L__BB0_14;

	and.b64  	%rd53, %rd8, 1;
	setp.eq.b64 	%p7, %rd53, 1;
	mov.pred 	%p8, 0;
	xor.pred  	%p9, %p7, %p8;
	not.pred 	%p10, %p9;
	@%p10 bra 	$L__BB0_11;
	bra.uni 	$L__BB0_8;

$L__BB0_11:
	shr.u64 	%rd13, %rd5, 1;
	setp.le.u64 	%p13, %rd13, %rd9;
	@%p13 bra 	$L__BB0_23;

	mov.u32 	%r15, %ntid.x;
	cvt.u64.u32 	%rd14, %r15;

$L__BB0_13:
	shl.b64 	%rd56, %rd9, 1;
	add.s64 	%rd57, %rd6, %rd56;
	ld.global.nc.u16 	%rs2, [%rd57];
	add.s64 	%rd58, %rd7, %rd56;
	st.u16 	[%rd58], %rs2;
	add.s64 	%rd9, %rd9, %rd14;
	setp.lt.u64 	%p14, %rd9, %rd13;
	@%p14 bra 	$L__BB0_13;
	bra.uni 	$L__BB0_23;

$L__BB0_20:
	shr.u64 	%rd25, %rd5, 4;
	setp.le.u64 	%p19, %rd25, %rd9;
	@%p19 bra 	$L__BB0_23;

	mov.u32 	%r19, %ntid.x;
	cvt.u64.u32 	%rd26, %r19;

$L__BB0_22:
	shl.b64 	%rd66, %rd9, 4;
	add.s64 	%rd67, %rd7, %rd66;
	add.s64 	%rd68, %rd6, %rd66;
	ld.global.nc.v4.u32 	{%r20, %r21, %r22, %r23}, [%rd68];
	st.v4.u32 	[%rd67], {%r20, %r21, %r22, %r23};
	add.s64 	%rd9, %rd9, %rd26;
	setp.lt.u64 	%p20, %rd9, %rd25;
	@%p20 bra 	$L__BB0_22;
	bra.uni 	$L__BB0_23;

$L__BB0_17:
	shr.u64 	%rd21, %rd5, 3;
	setp.le.u64 	%p17, %rd21, %rd9;
	@%p17 bra 	$L__BB0_23;

	mov.u32 	%r18, %ntid.x;
	cvt.u64.u32 	%rd22, %r18;

$L__BB0_19:
	shl.b64 	%rd62, %rd9, 3;
	add.s64 	%rd63, %rd6, %rd62;
	ld.global.nc.u64 	%rd64, [%rd63];
	add.s64 	%rd65, %rd7, %rd62;
	st.u64 	[%rd65], %rd64;
	add.s64 	%rd9, %rd9, %rd22;
	setp.lt.u64 	%p18, %rd9, %rd21;
	@%p18 bra 	$L__BB0_19;
	bra.uni 	$L__BB0_23;

$L__BB0_14:
	shr.u64 	%rd17, %rd5, 2;
	setp.le.u64 	%p15, %rd17, %rd9;
	@%p15 bra 	$L__BB0_23;

	mov.u32 	%r16, %ntid.x;
	cvt.u64.u32 	%rd18, %r16;

$L__BB0_16:
	shl.b64 	%rd59, %rd9, 2;
	add.s64 	%rd60, %rd6, %rd59;
	ld.global.nc.u32 	%r17, [%rd60];
	add.s64 	%rd61, %rd7, %rd59;
	st.u32 	[%rd61], %r17;
	add.s64 	%rd9, %rd9, %rd18;
	setp.lt.u64 	%p16, %rd9, %rd17;
	@%p16 bra 	$L__BB0_16;
	bra.uni 	$L__BB0_23;

$L__BB0_8:
	setp.le.u64 	%p11, %rd5, %rd9;
	@%p11 bra 	$L__BB0_23;

	mov.u32 	%r14, %ntid.x;
	cvt.u64.u32 	%rd10, %r14;

$L__BB0_10:
	add.s64 	%rd54, %rd6, %rd9;
	ld.global.nc.u8 	%rs1, [%rd54];
	add.s64 	%rd55, %rd7, %rd9;
	st.u8 	[%rd55], %rs1;
	add.s64 	%rd9, %rd9, %rd10;
	setp.lt.u64 	%p12, %rd9, %rd5;
	@%p12 bra 	$L__BB0_10;

$L__BB0_23:
	ret;

}
	// .globl	find_poison
.visible .entry find_poison(
	.param .u64 find_poison_param_0,
	.param .u64 find_poison_param_1,
	.param .u32 find_poison_param_2,
	.param .u64 find_poison_param_3
)
{
	.reg .pred 	%p<61>;
	.reg .b16 	%rs<28>;
	.reg .b32 	%r<76>;
	.reg .b64 	%rd<79>;


	ld.param.u64 	%rd27, [find_poison_param_0];
	ld.param.u64 	%rd25, [find_poison_param_1];
	ld.param.u32 	%r21, [find_poison_param_2];
	ld.param.u64 	%rd26, [find_poison_param_3];
	cvta.to.global.u64 	%rd1, %rd27;
	mov.u32 	%r1, %ctaid.x;
	mov.u32 	%r22, %ntid.x;
	cvt.u64.u32 	%rd2, %r22;
	mul.wide.u32 	%rd28, %r1, %r22;
	mov.u32 	%r2, %tid.x;
	cvt.u64.u32 	%rd29, %r2;
	add.s64 	%rd73, %rd28, %rd29;
	shr.u64 	%rd4, %rd25, 4;
	setp.ge.u64 	%p17, %rd73, %rd4;
	mov.u16 	%rs27, 0;
	@%p17 bra 	$L__BB1_18;

	setp.eq.s32 	%p18, %r21, 1;
	setp.eq.s32 	%p19, %r21, 2;
	selp.b64 	%rd30, 281479271743489, 4294967297, %p19;
	selp.b64 	%rd5, 72340172838076673, %rd30, %p18;
	shl.b32 	%r23, %r21, 3;
	add.s32 	%r24, %r23, -1;
	shl.b64 	%rd6, %rd5, %r24;
	mov.u32 	%r25, %nctaid.x;
	cvt.u64.u32 	%rd31, %r25;
	mul.lo.s64 	%rd7, %rd31, %rd2;
	setp.eq.s32 	%p20, %r21, 16;
	@%p20 bra 	$L__BB1_9;

	setp.ne.s32 	%p21, %r21, 8;
	@%p21 bra 	$L__BB1_11;

	mov.u32 	%r68, 0;

$L__BB1_4:
	shl.b64 	%rd32, %rd73, 4;
	add.s64 	%rd33, %rd1, %rd32;
	ld.global.nc.v4.u32 	{%r27, %r28, %r29, %r30}, [%rd33];
	cvt.u64.u32 	%rd34, %r28;
	cvt.u64.u32 	%rd35, %r27;
	bfi.b64 	%rd36, %rd34, %rd35, 32, 32;
	cvt.u64.u32 	%rd37, %r30;
	cvt.u64.u32 	%rd38, %r29;
	bfi.b64 	%rd9, %rd37, %rd38, 32, 32;
	setp.eq.s64 	%p23, %rd36, -1;
	mov.pred 	%p56, -1;
	@%p23 bra 	$L__BB1_8;

	setp.eq.s32 	%p24, %r21, 8;
	@%p24 bra 	$L__BB1_7;
	bra.uni 	$L__BB1_6;

$L__BB1_7:
	setp.eq.s64 	%p56, %rd9, -1;
	bra.uni 	$L__BB1_8;

$L__BB1_6:
	not.b64 	%rd39, %rd9;
	sub.s64 	%rd40, %rd39, %rd5;
	and.b64  	%rd41, %rd9, %rd6;
	and.b64  	%rd42, %rd41, %rd40;
	setp.ne.s64 	%p56, %rd42, 0;

$L__BB1_8:
	selp.u32 	%r35, 1, 0, %p56;
	or.b32  	%r36, %r68, %r35;
	setp.ne.s32 	%p58, %r36, 0;
	selp.u32 	%r68, 1, 0, %p58;
	add.s64 	%rd73, %rd73, %rd7;
	setp.lt.u64 	%p25, %rd73, %rd4;
	@%p25 bra 	$L__BB1_4;
	bra.uni 	$L__BB1_17;

$L__BB1_9:
	mov.u32 	%r69, 0;

$L__BB1_10:
	shl.b64 	%rd43, %rd73, 4;
	add.s64 	%rd44, %rd1, %rd43;
	ld.global.nc.v4.u32 	{%r38, %r39, %r40, %r41}, [%rd44];
	cvt.u64.u32 	%rd45, %r39;
	cvt.u64.u32 	%rd46, %r38;
	bfi.b64 	%rd47, %rd45, %rd46, 32, 32;
	cvt.u64.u32 	%rd48, %r41;
	cvt.u64.u32 	%rd49, %r40;
	bfi.b64 	%rd50, %rd48, %rd49, 32, 32;
	and.b64  	%rd51, %rd47, %rd50;
	setp.eq.s64 	%p26, %rd51, -1;
	selp.u32 	%r46, 1, 0, %p26;
	or.b32  	%r47, %r69, %r46;
	setp.ne.s32 	%p58, %r47, 0;
	selp.u32 	%r69, 1, 0, %p58;
	add.s64 	%rd73, %rd73, %rd7;
	setp.lt.u64 	%p27, %rd73, %rd4;
	@%p27 bra 	$L__BB1_10;
	bra.uni 	$L__BB1_17;

$L__BB1_11:
	mov.u32 	%r70, 0;

$L__BB1_12:
	shl.b64 	%rd52, %rd73, 4;
	add.s64 	%rd53, %rd1, %rd52;
	ld.global.nc.v4.u32 	{%r49, %r50, %r51, %r52}, [%rd53];
	cvt.u64.u32 	%rd54, %r50;
	cvt.u64.u32 	%rd55, %r49;
	bfi.b64 	%rd56, %rd54, %rd55, 32, 32;
	cvt.u64.u32 	%rd57, %r52;
	cvt.u64.u32 	%rd58, %r51;
	bfi.b64 	%rd14, %rd57, %rd58, 32, 32;
	not.b64 	%rd59, %rd56;
	sub.s64 	%rd60, %rd59, %rd5;
	and.b64  	%rd61, %rd56, %rd6;
	and.b64  	%rd62, %rd61, %rd60;
	setp.ne.s64 	%p29, %rd62, 0;
	mov.pred 	%p57, -1;
	@%p29 bra 	$L__BB1_16;

	setp.eq.s32 	%p30, %r21, 8;
	@%p30 bra 	$L__BB1_15;
	bra.uni 	$L__BB1_14;

$L__BB1_15:
	setp.eq.s64 	%p57, %rd14, -1;
	bra.uni 	$L__BB1_16;

$L__BB1_14:
	not.b64 	%rd63, %rd14;
	sub.s64 	%rd64, %rd63, %rd5;
	and.b64  	%rd65, %rd14, %rd6;
	and.b64  	%rd66, %rd65, %rd64;
	setp.ne.s64 	%p57, %rd66, 0;

$L__BB1_16:
	selp.u32 	%r57, 1, 0, %p57;
	or.b32  	%r58, %r70, %r57;
	setp.ne.s32 	%p58, %r58, 0;
	selp.u32 	%r70, 1, 0, %p58;
	add.s64 	%rd73, %rd73, %rd7;
	setp.lt.u64 	%p31, %rd73, %rd4;
	@%p31 bra 	$L__BB1_12;

$L__BB1_17:
	selp.u16 	%rs27, 1, 0, %p58;

$L__BB1_18:
	or.b32  	%r59, %r1, %r2;
	setp.ne.s32 	%p32, %r59, 0;
	setp.gt.u32 	%p33, %r21, 15;
	or.pred  	%p34, %p32, %p33;
	@%p34 bra 	$L__BB1_32;

	and.b64  	%rd77, %rd25, -16;
	cvt.u64.u32 	%rd17, %r21;
	add.s64 	%rd76, %rd77, %rd17;
	setp.gt.u64 	%p35, %rd76, %rd25;
	@%p35 bra 	$L__BB1_32;

	setp.eq.s32 	%p36, %r21, 0;
	@%p36 bra 	$L__BB1_31;

	add.s32 	%r9, %r21, -1;
	and.b32  	%r10, %r21, 3;
	sub.s32 	%r11, %r21, %r10;

$L__BB1_22:
	mov.u64 	%rd20, %rd77;
	mov.u64 	%rd77, %rd76;
	setp.lt.u32 	%p38, %r9, 3;
	mov.u32 	%r75, 1;
	mov.u32 	%r74, 0;
	@%p38 bra 	$L__BB1_25;

	mov.u32 	%r73, %r11;

$L__BB1_24:
	cvt.u64.u32 	%rd67, %r74;
	add.s64 	%rd68, %rd20, %rd67;
	add.s64 	%rd69, %rd1, %rd68;
	ld.global.nc.u8 	%rs7, [%rd69];
	setp.eq.s16 	%p39, %rs7, 255;
	selp.u32 	%r64, 1, 0, %p39;
	and.b32  	%r65, %r75, %r64;
	setp.ne.s32 	%p40, %r65, 0;
	ld.global.nc.u8 	%rs9, [%rd69+2];
	ld.global.nc.u8 	%rs10, [%rd69+1];
	and.b16  	%rs11, %rs10, %rs9;
	and.b16  	%rs12, %rs11, 255;
	setp.eq.s16 	%p41, %rs12, 255;
	and.pred  	%p42, %p41, %p40;
	ld.global.nc.u8 	%rs13, [%rd69+3];
	setp.eq.s16 	%p43, %rs13, 255;
	and.pred  	%p60, %p42, %p43;
	selp.u32 	%r75, 1, 0, %p60;
	add.s32 	%r74, %r74, 4;
	add.s32 	%r73, %r73, -4;
	setp.ne.s32 	%p44, %r73, 0;
	@%p44 bra 	$L__BB1_24;

$L__BB1_25:
	setp.eq.s32 	%p45, %r10, 0;
	@%p45 bra 	$L__BB1_29;

	setp.eq.s32 	%p46, %r10, 1;
	cvt.u64.u32 	%rd70, %r74;
	add.s64 	%rd71, %rd20, %rd70;
	add.s64 	%rd21, %rd1, %rd71;
	ld.global.nc.u8 	%rs15, [%rd21];
	setp.eq.s16 	%p47, %rs15, 255;
	selp.u32 	%r66, 1, 0, %p47;
	and.b32  	%r20, %r75, %r66;
	setp.ne.s32 	%p60, %r20, 0;
	@%p46 bra 	$L__BB1_29;

	setp.ne.s32 	%p48, %r20, 0;
	ld.global.nc.u8 	%rs17, [%rd21+1];
	setp.eq.s16 	%p49, %rs17, 255;
	and.pred  	%p60, %p48, %p49;
	setp.eq.s32 	%p50, %r10, 2;
	@%p50 bra 	$L__BB1_29;

	ld.global.nc.u8 	%rs19, [%rd21+2];
	setp.eq.s16 	%p51, %rs19, 255;
	and.pred  	%p60, %p60, %p51;

$L__BB1_29:
	selp.u16 	%rs21, 1, 0, %p60;
	or.b16  	%rs22, %rs27, %rs21;
	and.b16  	%rs23, %rs22, 255;
	setp.ne.s16 	%p52, %rs23, 0;
	selp.u16 	%rs27, 1, 0, %p52;
	add.s64 	%rd76, %rd77, %rd17;
	setp.gt.u64 	%p53, %rd76, %rd25;
	@%p53 bra 	$L__BB1_32;
	bra.uni 	$L__BB1_22;

$L__BB1_31:
	add.s64 	%rd76, %rd76, %rd17;
	setp.le.u64 	%p54, %rd76, %rd25;
	mov.u16 	%rs27, 1;
	@%p54 bra 	$L__BB1_31;

$L__BB1_32:
	setp.eq.s16 	%p55, %rs27, 0;
	@%p55 bra 	$L__BB1_34;

	cvta.to.global.u64 	%rd72, %rd26;
	mov.u32 	%r67, 1;
	st.global.u32 	[%rd72], %r67;

$L__BB1_34:
	ret;

}

"""


class Kernel(NamedTuple):
    """``place_ranges`` and ``find_poison`` loaded into the current CUDA context, and the driver call that launches
    them."""

    function: ctypes.c_void_p  # place_ranges
    finder: ctypes.c_void_p  # find_poison
    launch: Any

    @staticmethod
    def load() -> Kernel | str:
        """The kernels for the calling thread's current context, or why they cannot be had."""
        try:
            cuda = ctypes.PyDLL("libcuda.so.1")
        except OSError as exc:
            return f"libcuda: {exc}"
        module = ctypes.c_void_p()
        rc = cuda.cuModuleLoadData(ctypes.byref(module), PTX.encode() + b"\0")
        if rc:
            return f"cuModuleLoadData: CUDA error {rc}"
        functions = []
        for name in (b"place_ranges", b"find_poison"):
            function = ctypes.c_void_p()
            rc = cuda.cuModuleGetFunction(ctypes.byref(function), module, name)
            if rc:
                return f"cuModuleGetFunction({name.decode()}): CUDA error {rc}"
            functions.append(function)
        launch = cuda.cuLaunchKernel
        u = ctypes.c_uint
        launch.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        launch.restype = ctypes.c_int
        return Kernel(functions[0], functions[1], launch)

    def place(self, rows_ptr: int, rows: int, chunks: int, src_ptr: int, stream: int) -> None:
        """Enqueue the copies of ``rows`` table rows at ``rows_ptr`` (``chunks`` chunks in all) from the
        staged read at ``src_ptr``."""
        args = (ctypes.c_uint64(rows_ptr), ctypes.c_uint32(rows), ctypes.c_uint64(src_ptr), ctypes.c_uint64(CHUNK))
        params = (ctypes.c_void_p * 4)(*(ctypes.addressof(x) for x in args))
        rc = self.launch(self.function, chunks, 1, 1, THREADS, 1, 1, 0, stream, params, None)
        if rc:
            raise RuntimeError(f"cuLaunchKernel(place_ranges) failed with CUDA error {rc}")

    def find_poison(self, ptr: int, nbytes: int, lane: int, hit_ptr: int, stream: int) -> None:
        """Enqueue the scan of ``nbytes`` bytes at ``ptr`` (16-byte aligned) for poison: an element of ``lane`` bytes
        with every bit set, or (``lane`` 16) a 16-byte run of 0xFF; the ``uint32`` at ``hit_ptr`` is set to 1 if
        any is found, else left as it is. One read of every byte, at the memory's speed."""
        args = (ctypes.c_uint64(ptr), ctypes.c_uint64(nbytes), ctypes.c_uint32(lane), ctypes.c_uint64(hit_ptr))
        params = (ctypes.c_void_p * 4)(*(ctypes.addressof(x) for x in args))
        blocks = max(1, min(SCAN_BLOCKS, -(-nbytes // (16 * THREADS))))
        rc = self.launch(self.finder, blocks, 1, 1, THREADS, 1, 1, 0, stream, params, None)
        if rc:
            raise RuntimeError(f"cuLaunchKernel(find_poison) failed with CUDA error {rc}")


def compile_ptx(libnvrtc: str, arch: str = "compute_70") -> str:
    """``SOURCE`` through NVRTC (the library at ``libnvrtc``): how ``PTX`` was made. NVRTC leaves the process's
    locale codeset at ASCII: call it in a process of its own (``python -m nhcheck.load.kernel LIBNVRTC``)."""
    lib = ctypes.CDLL(libnvrtc)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.encode(), b"place.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = (ctypes.c_char_p * 2)(f"--gpu-architecture={arch}".encode(), b"-default-device")
    if lib.nvrtcCompileProgram(prog, 2, opts):
        raise RuntimeError("nvrtcCompileProgram failed")
    n = ctypes.c_size_t()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    out = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, out)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return out.value.decode()


if __name__ == "__main__":
    sys.stdout.write(compile_ptx(sys.argv[1]))
