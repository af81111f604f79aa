// SPDX-License-Identifier: GPL-2.0
/*
 * vfio_pfnmap_lab: huge pfnmaps of a vfio-pci BAR, end to end.
 *
 * Runs in the guest of tools/lab against a real vfio-pci device behind a
 * (virtual) VT-d, through the vfio type1 legacy container, and prints its
 * numbers as "# lab: key=value" lines for the host to tabulate.  The tests
 * assert what the pfnmap series claims, so on a kernel without the series
 * some of them are expected to fail (tools/lab.d/expect says which):
 *
 *   placement       mmap(NULL) of the BAR is placed where PUD leaves fit
 *                   (va == pa modulo the largest leaf the BAR holds)
 *   touch_faults    touching every page of that mapping takes one fault
 *                   per leaf (2 for a 2 GiB BAR)
 *   smaps_refaults  reading /proc/self/smaps does not zap the PUD leaves of
 *                   a mapping placed by hand for them, as VMMs do
 *   map_dma         VFIO_IOMMU_MAP_DMA of the whole BAR mmap'ed at
 *                   mmap(NULL), timed
 *
 * The race tests map the BAR themselves, with MAP_FIXED, so that every
 * kernel gets the same page table entries whatever its placement:
 *
 *   race_pud        BAR mapped where PUD leaves fit.  The MAP_DMA thread
 *                   maps the BAR again in place (nothing mapped), then
 *                   VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA of its first
 *                   LAB_RACE_LEN bytes; each call faults the leaf in.  A
 *                   second thread waits until the MAP_DMA thread sleeps in
 *                   the lab's delay, i.e. between the fault-in and the
 *                   look-up after it, and only then turns memory decoding
 *                   off and on through the config region (vfio-pci zaps
 *                   every mapping of the BARs): one window entered per
 *                   call.  MAP_DMA of a valid range must never fail with
 *                   EINVAL.
 *   race_pte        the same with the BAR mapped 4 KiB off that alignment,
 *                   so that every kernel maps PTEs (LAB_RACE_PTE_LEN bytes
 *                   per call, a fault-in per page)
 *   race_unmap      race_pud, and on every other call the second thread
 *                   also munmap()s the BAR, which a third thread's zap of
 *                   the retry's window lets in while the retry has dropped
 *                   the mmap lock: the retry finds no VMA.  MAP_DMA must
 *                   fail with EFAULT then, as for any unmapped range: not
 *                   EINVAL, and no new error (the first revision of the
 *                   type1 retry returned EAGAIN).
 *   walk_race       seed 000 end to end: PUD leaves, and the second thread
 *                   reads /proc/self/smaps or /proc/self/numa_maps inside
 *                   each window.  A page walk must not zap (split) the
 *                   leaf, and MAP_DMA must not fail.
 *   adversaries     PUD leaves; MAP_DMA / UNMAP_DMA in a loop while other
 *                   threads toggle memory, mprotect() half the BAR (a
 *                   whole PUD leaf) read-only and back,
 *                   fork() (copying the huge pfnmap leaves) and munmap()
 *                   and mmap() the BAR again at the same address.  Every
 *                   errno is counted; EINVAL (a lost race) must not occur.
 *   mprotect_none   PROT_NONE of a whole PUD leaf and back (x86 warns on
 *                   every kernel: a known bug the series does not fix)
 *   mprotect_split  PROT_NONE of 2 MiB inside a PUD leaf (v7.3 oopses)
 *   kvm_race        (x86_64) a KVM guest whose memory slot is the BAR,
 *                   mapped for PUD leaves, reads and writes it in a loop
 *                   while memory is toggled as above, each toggle inside
 *                   a window (the vCPU thread between fault-in and
 *                   look-up).  KVM_RUN must never fail, the guest must
 *                   never read back what it did not write, SIGKILL must
 *                   end the VMM promptly while every window is zapped, and
 *                   with memory off KVM_RUN must still fail with EFAULT (a
 *                   genuine error is not retried for ever).
 *
 * Counted in the kernel, with nothing added to it: tracefs kprobe events
 * aggregated by hist triggers (fault-ins, the look-up right after each
 * fault-in and what it returned, follow_pfnmap_fault() asking its caller
 * to retry, vfio-pci zaps, KVM error pfns and refused device faults), and
 * the thp_split_pud / thp_split_pmd counters of /proc/vmstat.
 *
 * Usage: vfio_pfnmap_lab [harness options] -- BDF [BAR]
 * Environment (all optional): LAB_RACE_ITERS (400: MAP_DMA calls of each
 * race test), LAB_RACE_SECONDS (20: time bound of each), LAB_RACE_LEN
 * (2 MiB), LAB_RACE_PTE_LEN (64 KiB), LAB_TOGGLE_US (3000: the period of
 * adversaries that are not in step with a window), LAB_RACE_DELAY_US (0:
 * if set and the kernel has /sys/module/kernel/parameters/mm_race_delay_us,
 * the lab-only patch, the window between fault-in and look-up is widened
 * by that much and the race tests act inside it; else they act every
 * LAB_TOGGLE_US), LAB_KVM_SECONDS (20), LAB_KVM_TOGGLES (100),
 * LAB_KVM_DELAY_US (20000: the window of kvm_race, which must be longer
 * than a toggle; used only where LAB_RACE_DELAY_US is set).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/kvm.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>

#include "kselftest_harness.h"
#include "lab_common.h"

#define SZ_4K		0x1000UL
#define SZ_2M		0x200000UL
#define SZ_1G		0x40000000UL
#define LAB_IOVA	(1UL << 36)
#define DELAY_KNOB	"/sys/module/kernel/parameters/mm_race_delay_us"

static const char *bdf;
static int bar_index = 2;

static long minflt(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_minflt;
}

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* Physical start of BAR @bar of @bdf, from sysfs. */
static uint64_t bar_phys(int bar)
{
	char path[128], line[256];
	uint64_t start = 0, end, flags;
	FILE *f;
	int i;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource", bdf);
	f = fopen(path, "r");
	if (!f)
		return 0;
	for (i = 0; i <= bar && fgets(line, sizeof(line), f); i++)
		if (i == bar && sscanf(line, "%lx %lx %lx", &start, &end, &flags) != 3)
			start = 0;
	fclose(f);
	return start;
}

/*
 * The fewest faults that can map [pa, pa + size) when va == pa modulo
 * 1 GiB: one per PUD leaf, PMD leaf or page that tiles it.
 */
static unsigned long leaves(uint64_t pa, uint64_t size)
{
	uint64_t end = pa + size;
	unsigned long n = 0;

	while (pa < end) {
		if (!(pa & (SZ_1G - 1)) && end - pa >= SZ_1G)
			pa += SZ_1G;
		else if (!(pa & (SZ_2M - 1)) && end - pa >= SZ_2M)
			pa += SZ_2M;
		else
			pa += SZ_4K;
		n++;
	}
	return n;
}

static void touch(const volatile char *p, size_t len)
{
	size_t off;

	for (off = 0; off < len; off += SZ_4K)
		(void)p[off];
}

static int dma_map(int container, void *vaddr, uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)vaddr,
		.iova = iova,
		.size = size,
	};

	return ioctl(container, VFIO_IOMMU_MAP_DMA, &map) ? -errno : 0;
}

static int dma_unmap(int container, uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_unmap unmap = {
		.argsz = sizeof(unmap),
		.iova = iova,
		.size = size,
	};

	return ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) ? -errno : 0;
}

FIXTURE(lab) {
	int container;
	int group;
	int device;
	uint64_t bar_off;
	uint64_t bar_size;
	uint64_t bar_pa;
	uint64_t cfg_off;
};

FIXTURE_SETUP(lab)
{
	struct vfio_group_status status = { .argsz = sizeof(status) };
	struct vfio_region_info bar = { .argsz = sizeof(bar), .index = bar_index };
	struct vfio_region_info cfg = {
		.argsz = sizeof(cfg),
		.index = VFIO_PCI_CONFIG_REGION_INDEX,
	};
	char path[PATH_MAX], link[PATH_MAX];
	ssize_t n;

	ASSERT_NE(NULL, bdf) TH_LOG("no device: pass -- BDF");
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	n = readlink(path, link, sizeof(link) - 1);
	ASSERT_GT(n, 0) TH_LOG("%s: %s (no IOMMU?)", path, strerror(errno));
	link[n] = 0;
	snprintf(path, sizeof(path), "/dev/vfio/%s", strrchr(link, '/') + 1);

	self->container = open("/dev/vfio/vfio", O_RDWR);
	ASSERT_GE(self->container, 0) TH_LOG("/dev/vfio/vfio: %s", strerror(errno));
	ASSERT_EQ(VFIO_API_VERSION, ioctl(self->container, VFIO_GET_API_VERSION));
	ASSERT_EQ(1, ioctl(self->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU));
	self->group = open(path, O_RDWR);
	ASSERT_GE(self->group, 0) TH_LOG("%s: %s", path, strerror(errno));
	ASSERT_EQ(0, ioctl(self->group, VFIO_GROUP_GET_STATUS, &status));
	ASSERT_TRUE(status.flags & VFIO_GROUP_FLAGS_VIABLE);
	ASSERT_EQ(0, ioctl(self->group, VFIO_GROUP_SET_CONTAINER, &self->container));
	ASSERT_EQ(0, ioctl(self->container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU));
	self->device = ioctl(self->group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	ASSERT_GE(self->device, 0) TH_LOG("device %s: %s", bdf, strerror(errno));

	ASSERT_EQ(0, ioctl(self->device, VFIO_DEVICE_GET_REGION_INFO, &bar));
	ASSERT_TRUE(bar.flags & VFIO_REGION_INFO_FLAG_MMAP)
		TH_LOG("BAR%d of %s cannot be mmap'ed", bar_index, bdf);
	ASSERT_EQ(0, ioctl(self->device, VFIO_DEVICE_GET_REGION_INFO, &cfg));
	self->bar_off = bar.offset;
	self->bar_size = bar.size;
	self->cfg_off = cfg.offset;
	self->bar_pa = bar_phys(bar_index);
	ASSERT_NE(0, self->bar_pa);
}

FIXTURE_TEARDOWN(lab)
{
	close(self->device);
	close(self->group);
	close(self->container);
}

/* PCI_COMMAND with memory decoding on and off, from the config region. */
static int memory_cmds(FIXTURE_DATA(lab) *self, uint16_t *on, uint16_t *off)
{
	uint16_t cmd;

	if (pread(self->device, &cmd, 2, self->cfg_off + PCI_COMMAND) != 2)
		return -1;
	*on = cmd | PCI_COMMAND_MEMORY;
	*off = cmd & ~PCI_COMMAND_MEMORY;
	return 0;
}

/* vfio-pci zaps every mmap of the BARs when memory is turned off. */
static int set_command(FIXTURE_DATA(lab) *self, uint16_t cmd)
{
	return pwrite(self->device, &cmd, 2, self->cfg_off + PCI_COMMAND) == 2 ? 0 : -1;
}

static int set_delay(unsigned long us)
{
	FILE *f = fopen(DELAY_KNOB, "w");
	int ret;

	if (!f)
		return -errno;
	ret = fprintf(f, "%lu\n", us) < 0 ? -EIO : 0;
	if (fclose(f))
		ret = -errno;
	return ret;
}

/* Is task @tid asleep in fixup_user_fault(), i.e. in the lab's delay? */
static bool in_window(int tid)
{
	char path[64], buf[64];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", tid);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = 0;
	/* fsleep() is inline: a short delay shows its caller, a long msleep */
	return !strcmp(buf, "fixup_user_fault") || !strcmp(buf, "msleep");
}

/*
 * Counted in the kernel: tracefs kprobe events, each aggregated by a hist
 * trigger, so nothing goes through the trace buffer however many events
 * there are.  The look-up right after a fault-in is paired with it thread
 * by thread: the fault-in (fixup_user_fault() returning 0) sets a variable
 * keyed by pid, and the next follow_pfnmap_start() return of that thread
 * reads it once (a variable in an expression is read once) and fires the
 * synthetic event lab_window with what the look-up returned.  So
 * lab_window counts the windows between fault-in and look-up, and those
 * with ret != 0 are the look-ups that found the fault-in undone: lost
 * races.
 */
enum kev { KEV_FAULTIN, KEV_LOOKUP, KEV_RETRY, KEV_ZAP, KEV_ERRPFN, KEV_SIGBUS, NKEV };

/*
 * @def is the probe; @older, if set, is tried first: the same event on an
 * older kernel, whose function the newer kernels do not have.
 */
static const struct {
	const char *name, *def, *trigger, *older;
} kevs[NKEV] = {
	[KEV_FAULTIN] = { "faultin", "r:lab/faultin fixup_user_fault ret=$retval:s32",
			  "hist:keys=common_pid:t0=common_timestamp if ret == 0" },
	[KEV_LOOKUP] = { "lookup", "r:lab/lookup follow_pfnmap_start ret=$retval:s32",
			 "hist:keys=common_pid:dt=common_timestamp-$t0:onmatch(lab.faultin).trace(lab_window,ret)" },
	/* follow_pfnmap_fault() asks its caller to look again (the series) */
	[KEV_RETRY] = { "retry", "r:lab/retry follow_pfnmap_fault ret=$retval:s32",
			"hist:keys=common_pid if ret == -11" },
	[KEV_ZAP] = { "zap", "p:lab/zap vfio_pci_zap_and_down_write_memory_lock",
		      "hist:keys=common_pid" },
	/*
	 * KVM_PFN_ERR_FAULT from the fault-in: __kvm_faultin_pfn() since
	 * 6.13; 6.12 has __gfn_to_pfn_memslot() (and an x86 __kvm_faultin_pfn()
	 * of its own that returns no pfn, hence the order).
	 */
	[KEV_ERRPFN] = { "errpfn", "r:lab/errpfn __kvm_faultin_pfn ret=$retval:x64",
			 "hist:keys=common_pid if ret == 0x7ff0000000000000",
			 "r:lab/errpfn __gfn_to_pfn_memslot ret=$retval:x64" },
	/* VM_FAULT_SIGBUS: a device fault refused, memory off */
	[KEV_SIGBUS] = { "sigbus", "r:lab/sigbus vfio_pci_mmap_huge_fault ret=$retval:x32",
			 "hist:keys=common_pid if ret == 2" },
};

#define KC(e)		(1u << (e))
#define KC_WINDOW	(KC(KEV_FAULTIN) | KC(KEV_LOOKUP))
#define WINDOW_EVENT	"lab_window s32 ret"
#define WINDOW_TRIGGER	"hist:keys=ret"

struct kcount {
	bool on[NKEV];
	bool window;
	long n[NKEV];		/* hits; -1: not counted on this kernel */
	long windows;		/* look-ups right after a fault-in */
	long lost;		/* ... that found nothing: a lost race */
	long split_pud;		/* /proc/vmstat deltas */
	long split_pmd;
};

static long vmstat(const char *key)
{
	size_t len = strlen(key);
	char line[128];
	long v = -1;
	FILE *f;

	f = fopen("/proc/vmstat", "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, key, len) && line[len] == ' ') {
			v = atol(line + len + 1);
			break;
		}
	}
	fclose(f);
	return v;
}

/* Remove the triggers (those that read a variable first), then the events. */
static void kc_teardown(void)
{
	char file[128], trig[256];
	int i;

	for (i = NKEV - 1; i >= 0; i--) {
		snprintf(file, sizeof(file), "events/lab/%s/trigger", kevs[i].name);
		snprintf(trig, sizeof(trig), "!%s", kevs[i].trigger);
		tracefs_write(file, trig, true);
	}
	tracefs_write("events/synthetic/lab_window/trigger", "!" WINDOW_TRIGGER, true);
	tracefs_write("synthetic_events", "!lab_window", true);
	tracefs_write("kprobe_events", "", false);
}

/*
 * Set up the events of @mask.  A probe on a function this kernel does not
 * have (follow_pfnmap_fault() before the series) is left out and reads -1.
 */
static void kc_start(struct kcount *kc, unsigned int mask)
{
	char file[128];
	int i, ret;

	memset(kc, 0, sizeof(*kc));
	kc_teardown();
	for (i = 0; i < NKEV; i++) {
		kc->n[i] = -1;
		if (!(mask & KC(i)))
			continue;
		ret = -ENOENT;
		if (kevs[i].older)
			ret = tracefs_write("kprobe_events", kevs[i].older, true);
		if (ret)
			ret = tracefs_write("kprobe_events", kevs[i].def, true);
		if (ret)
			printf("# kcount: %s: %s\n", kevs[i].def, strerror(-ret));
		kc->on[i] = !ret;
	}
	if ((mask & KC_WINDOW) == KC_WINDOW && kc->on[KEV_FAULTIN] && kc->on[KEV_LOOKUP]) {
		ret = tracefs_write("synthetic_events", WINDOW_EVENT, true);
		if (!ret)
			ret = tracefs_write("events/synthetic/lab_window/trigger",
					    WINDOW_TRIGGER, true);
		if (ret)
			printf("# kcount: synthetic lab_window: %s\n", strerror(-ret));
		kc->window = !ret;
	}
	for (i = 0; i < NKEV; i++) {
		if (kc->on[i] && (KC(i) & KC_WINDOW) && !kc->window)
			kc->on[i] = false;
		if (!kc->on[i])
			continue;
		snprintf(file, sizeof(file), "events/lab/%s/trigger", kevs[i].name);
		ret = tracefs_write(file, kevs[i].trigger, true);
		if (ret) {
			printf("# kcount: %s: '%s': %s\n", kevs[i].name, kevs[i].trigger,
			       strerror(-ret));
			kc->on[i] = false;
			if (KC(i) & KC_WINDOW)
				kc->window = false;
		}
	}
	fflush(stdout);
	kc->split_pud = vmstat("thp_split_pud");
	kc->split_pmd = vmstat("thp_split_pmd");
}

/*
 * Sum the hitcounts of a hist file: all of them, and those whose (first)
 * key is not 0.  Lines read "{ key: value } hitcount: N"; a negative s32
 * key may print as a 64-bit unsigned number, hence the cast.
 */
static void hist_read(const char *file, long *all, long *nonzero)
{
	char path[256], line[512], *h, *k;
	FILE *f;
	long n;

	*all = *nonzero = -1;
	snprintf(path, sizeof(path), TRACEFS "/%s", file);
	f = fopen(path, "r");
	if (!f)
		return;
	*all = *nonzero = 0;
	while (fgets(line, sizeof(line), f)) {
		h = strstr(line, "hitcount:");
		k = strchr(line, ':');
		if (line[0] != '{' || !h || !k || k >= h)
			continue;
		n = strtol(h + strlen("hitcount:"), NULL, 10);
		*all += n;
		if ((int32_t)strtoull(k + 1, NULL, 0))
			*nonzero += n;
	}
	fclose(f);
}

static void kc_stop(struct kcount *kc)
{
	char file[128];
	long unused;
	int i;

	for (i = 0; i < NKEV; i++) {
		if (!kc->on[i])
			continue;
		snprintf(file, sizeof(file), "events/lab/%s/hist", kevs[i].name);
		hist_read(file, &kc->n[i], &unused);
	}
	kc->windows = kc->lost = -1;
	if (kc->window)
		hist_read("events/synthetic/lab_window/hist", &kc->windows, &kc->lost);
	if (kc->split_pud >= 0)
		kc->split_pud = vmstat("thp_split_pud") - kc->split_pud;
	if (kc->split_pmd >= 0)
		kc->split_pmd = vmstat("thp_split_pmd") - kc->split_pmd;
	kc_teardown();
}

/* Where the race tests map the BAR: the same on every kernel. */
enum bar_at {
	BAR_ANYWHERE,	/* mmap(NULL): wherever the kernel places it */
	BAR_PUD,	/* va == pa modulo 1 GiB: PUD leaves where they fit */
	BAR_PTE,	/* 4 KiB off that: no leaf above a PTE fits anywhere */
};

static void *map_bar(FIXTURE_DATA(lab) *self, enum bar_at at)
{
	uintptr_t r, want = 0;
	void *p;

	if (at != BAR_ANYWHERE) {
		/* What QEMU and the vfio selftests do: reserve, then align. */
		p = mmap(NULL, self->bar_size + 2 * SZ_1G, PROT_NONE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (p == MAP_FAILED)
			return NULL;
		r = (uintptr_t)p;
		want = ((r + SZ_1G - 1) & ~(SZ_1G - 1)) + (self->bar_pa & (SZ_1G - 1));
		if (at == BAR_PTE)
			want += SZ_4K;
	}
	p = mmap((void *)want, self->bar_size, PROT_READ | PROT_WRITE,
		 MAP_SHARED | (want ? MAP_FIXED : 0), self->device, self->bar_off);
	return p == MAP_FAILED ? NULL : p;
}

/* Map the BAR again in place: nothing is mapped until the next fault. */
static int remap_bar(FIXTURE_DATA(lab) *self, void *p)
{
	return mmap(p, self->bar_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
		    self->device, self->bar_off) == p ? 0 : -errno;
}

/* Read all of a /proc file into a buffer touched beforehand. */
static char proc_buf[65536];

static int read_proc(const char *path)
{
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	do
		n = read(fd, proc_buf, sizeof(proc_buf));
	while (n > 0);
	close(fd);
	return n < 0 ? -errno : 0;
}

static int read_smaps(void)
{
	return read_proc("/proc/self/smaps");
}

TEST_F(lab, placement)
{
	uint64_t mask = self->bar_size >= SZ_1G ? SZ_1G - 1 : SZ_2M - 1;
	char *p = map_bar(self, BAR_ANYWHERE);

	ASSERT_NE(NULL, p);
	note("bar_size=%lu bar_pa=0x%lx mmap_null=%p va_mod_1g=0x%lx pa_mod_1g=0x%lx",
	     self->bar_size, self->bar_pa, p, (uintptr_t)p & (SZ_1G - 1),
	     self->bar_pa & (SZ_1G - 1));
	EXPECT_EQ(self->bar_pa & mask, (uintptr_t)p & mask);
	munmap(p, self->bar_size);
}

TEST_F_TIMEOUT(lab, touch_faults, 600)
{
	char *p = map_bar(self, BAR_ANYWHERE);
	long f;

	ASSERT_NE(NULL, p);
	f = minflt();
	touch(p, self->bar_size);
	f = minflt() - f;
	note("touch_faults=%ld leaves=%lu", f, leaves(self->bar_pa, self->bar_size));
	EXPECT_EQ(leaves(self->bar_pa, self->bar_size), f);
	munmap(p, self->bar_size);
}

TEST_F_TIMEOUT(lab, smaps_refaults, 600)
{
	char *p = map_bar(self, BAR_PUD);
	long f;

	ASSERT_NE(NULL, p);
	memset(proc_buf, 0, sizeof(proc_buf));
	f = minflt();
	touch(p, self->bar_size);
	note("aligned_touch_faults=%ld", minflt() - f);
	f = minflt();
	ASSERT_EQ(0, read_smaps());
	touch(p, self->bar_size);
	f = minflt() - f;
	note("smaps_refaults=%ld", f);
	EXPECT_EQ(0, f);
	munmap(p, self->bar_size);
}

TEST_F_TIMEOUT(lab, map_dma, 900)
{
	char *p = map_bar(self, BAR_ANYWHERE);
	double t;
	int ret;

	ASSERT_NE(NULL, p);
	t = now_us();
	ret = dma_map(self->container, p, LAB_IOVA, self->bar_size);
	t = now_us() - t;
	note("map_dma_us=%.0f map_dma_ret=%d", t, ret);
	ASSERT_EQ(0, ret);
	t = now_us();
	ASSERT_EQ(0, dma_unmap(self->container, LAB_IOVA, self->bar_size));
	note("unmap_dma_us=%.0f", now_us() - t);
	munmap(p, self->bar_size);
}

/*
 * The race tests: the test's thread calls VFIO_IOMMU_MAP_DMA and
 * VFIO_IOMMU_UNMAP_DMA in a loop, and actors race it.  An actor in step
 * with the MAP_DMA thread (r->rendezvous) waits until that thread sleeps in
 * the lab's delay, between a fault-in and the look-up after it, acts, and
 * waits for the call to return: one window entered per call.  Other actors
 * act every r->period_us.
 */
enum act {
	ACT_TOGGLE, ACT_WALK, ACT_MPROTECT, ACT_FORK, ACT_REMAP, ACT_UNMAP, ACT_REZAP,
	NACT
};

static const char *const act_name[NACT] = {
	"toggles", "walks", "mprotects", "forks", "remaps", "unmaps", "rezaps",
};

struct race {
	FIXTURE_DATA(lab) *self;
	char *bar;
	bool rendezvous;
	unsigned long period_us;
	int tid;			/* the MAP_DMA thread */
	uint16_t on, off;		/* PCI_COMMAND, memory on and off */
	atomic_bool stop;
	atomic_ulong calls;		/* MAP_DMA calls that returned */
	pthread_mutex_t map_lock;	/* mprotect() never sees a remap's gap */
};

struct actor {
	struct race *r;
	enum act act;
	pthread_t thread;
	bool started;
	atomic_ulong done;
	atomic_ulong errors;
	int last_errno;
};

/* mprotect() or remap, under r->map_lock. */
static int act_map(struct actor *a, unsigned long i)
{
	struct race *r = a->r;
	uint64_t size = r->self->bar_size, part = size / 2;
	char *p = r->bar;

	if (a->act == ACT_MPROTECT) {
		/*
		 * The second half of the BAR: a whole PUD leaf for a 2 GiB BAR,
		 * read-only and back.  (PROT_NONE of a PUD leaf is
		 * mprotect_none's: x86 warns on every kernel; 2 MiB inside a
		 * leaf is mprotect_split's: v7.3 oopses.)
		 */
		p += part;
		size -= part;
		if (mprotect(p, size, PROT_READ) ||
		    mprotect(p, size, PROT_READ | PROT_WRITE))
			return -errno;
		return 0;
	}
	/* In place, or with a gap in which MAP_DMA finds no VMA. */
	if (i & 1)
		return remap_bar(r->self, p);
	if (munmap(p, size))
		return -errno;
	if (mmap(p, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE,
		 r->self->device, r->self->bar_off) != p)
		return -errno;
	return 0;
}

static int act_once(struct actor *a, unsigned long i)
{
	struct race *r = a->r;
	int status, ret;
	pid_t pid;

	switch (a->act) {
	case ACT_MPROTECT:
	case ACT_REMAP:
		pthread_mutex_lock(&r->map_lock);
		ret = act_map(a, i);
		pthread_mutex_unlock(&r->map_lock);
		return ret;
	case ACT_TOGGLE:
	case ACT_REZAP:
		if (set_command(r->self, r->off) || set_command(r->self, r->on))
			return -errno;
		return 0;
	case ACT_UNMAP:
		/*
		 * A lost race, and on odd calls the BAR unmapped too: munmap()
		 * waits for the mmap lock until the retry drops it.  The MAP_DMA
		 * thread maps the BAR again before its next call.
		 */
		if (set_command(r->self, r->off) || set_command(r->self, r->on))
			return -errno;
		if ((i & 1) && munmap(r->bar, r->self->bar_size))
			return -errno;
		return 0;
	case ACT_WALK:
		/* numa_maps is where the original report crashed */
		return read_proc(i & 1 ? "/proc/self/numa_maps" : "/proc/self/smaps");
	case ACT_FORK:
		/* The child gets a copy of the huge pfnmap leaves, and exits. */
		pid = fork();
		if (pid < 0)
			return -errno;
		if (!pid)
			_exit(0);
		if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
			return -ECHILD;
		return 0;
	default:
		return -EINVAL;
	}
}

static void *actor_thread(void *arg)
{
	struct actor *a = arg;
	struct race *r = a->r;
	unsigned long seen, i = 0;
	int ret;

	while (!r->stop) {
		if (r->rendezvous) {
			while (!r->stop && !in_window(r->tid))
				sched_yield();
			if (r->stop)
				break;
		}
		seen = r->calls;
		if (a->act == ACT_REZAP && r->rendezvous) {
			/* Not this window: the next one of the same call, its retry's. */
			while (!r->stop && r->calls == seen && in_window(r->tid))
				sched_yield();
			while (!r->stop && r->calls == seen && !in_window(r->tid))
				sched_yield();
			if (r->stop || r->calls != seen)
				continue;
		}
		ret = act_once(a, i++);
		if (ret) {
			a->errors++;
			a->last_errno = -ret;
		}
		a->done++;
		if (r->rendezvous) {
			while (!r->stop && r->calls == seen)
				sched_yield();
		} else {
			usleep(r->period_us);
		}
	}
	return NULL;
}

struct dma_result {
	unsigned long calls, ok, einval, efault, other, remap_errors;
};

/*
 * MAP_DMA and UNMAP_DMA [bar + off, + len) until @iters calls or @end,
 * mapping the BAR again in place before each call if @remap, so that each
 * call faults; @off2, if not 0, is used every other call.
 */
static void dma_loop(struct __test_metadata *_metadata, struct race *r,
		     struct dma_result *res, unsigned long len, unsigned long off2,
		     bool remap, unsigned long iters, double end)
{
	unsigned long off;
	int ret;

	memset(res, 0, sizeof(*res));
	while (res->calls < iters && now_us() < end) {
		off = off2 && (res->calls & 1) ? off2 : 0;
		if (remap && remap_bar(r->self, r->bar)) {
			res->remap_errors++;
			break;
		}
		ret = dma_map(r->self->container, r->bar + off, LAB_IOVA, len);
		res->calls++;
		switch (ret) {
		case 0:
			res->ok++;
			if (dma_unmap(r->self->container, LAB_IOVA, len))
				res->other++;
			break;
		case -EINVAL:
			res->einval++;
			break;
		case -EFAULT:
			res->efault++;
			break;
		default:
			res->other++;
			TH_LOG("MAP_DMA: %s", strerror(-ret));
		}
		r->calls++;
	}
}

static void append(char *buf, size_t size, const char *prefix, const char *key, long v)
{
	size_t n = strlen(buf);

	snprintf(buf + n, size - n, "%s%s_%s=%ld", n ? " " : "", prefix, key, v);
}

/* One "# lab:" line with everything a race test measured. */
static void race_note(const char *prefix, struct dma_result *res, struct actor *actors,
		      int nactors, struct kcount *kc)
{
	char buf[1024] = "", key[32];
	int i;

	append(buf, sizeof(buf), prefix, "calls", res->calls);
	append(buf, sizeof(buf), prefix, "ok", res->ok);
	append(buf, sizeof(buf), prefix, "einval", res->einval);
	append(buf, sizeof(buf), prefix, "efault", res->efault);
	append(buf, sizeof(buf), prefix, "other", res->other);
	for (i = 0; i < nactors; i++) {
		append(buf, sizeof(buf), prefix, act_name[actors[i].act], actors[i].done);
		snprintf(key, sizeof(key), "%s_errors", act_name[actors[i].act]);
		append(buf, sizeof(buf), prefix, key, actors[i].errors);
	}
	append(buf, sizeof(buf), prefix, "windows", kc->windows);
	append(buf, sizeof(buf), prefix, "lost", kc->lost);
	append(buf, sizeof(buf), prefix, "retries", kc->n[KEV_RETRY]);
	append(buf, sizeof(buf), prefix, "zaps", kc->n[KEV_ZAP]);
	append(buf, sizeof(buf), prefix, "split_pud", kc->split_pud);
	append(buf, sizeof(buf), prefix, "split_pmd", kc->split_pmd);
	note("%s", buf);
}

/*
 * Run the MAP_DMA loop against @nactors actors; with @rendezvous, the
 * actors act inside the windows (if the kernel has the lab's delay).
 */
static void race_run_min(struct __test_metadata *_metadata, FIXTURE_DATA(lab) *self,
			 const char *prefix, enum bar_at at, unsigned long len,
			 unsigned long off2, bool rendezvous, unsigned long min_delay,
			 struct actor *actors, int nactors, struct dma_result *res,
			 struct kcount *kc)
{
	unsigned long iters = env_ul("LAB_RACE_ITERS", 400);
	unsigned long seconds = env_ul("LAB_RACE_SECONDS", 20);
	unsigned long delay = env_ul("LAB_RACE_DELAY_US", 0);
	struct race r = { .self = self, .map_lock = PTHREAD_MUTEX_INITIALIZER };
	int i;

	if (delay && delay < min_delay)
		delay = min_delay;
	r.period_us = env_ul("LAB_TOGGLE_US", 3000);
	r.bar = map_bar(self, at);
	ASSERT_NE(NULL, r.bar);
	ASSERT_EQ(0, memory_cmds(self, &r.on, &r.off));
	r.tid = syscall(SYS_gettid);
	r.rendezvous = rendezvous && delay && !set_delay(delay);
	note("%s_mode=%s %s_delay_us=%lu %s_len=%lu %s_va_mod_1g=0x%lx", prefix,
	     r.rendezvous ? "rendezvous" : "timed", prefix, r.rendezvous ? delay : 0,
	     prefix, len, prefix, (uintptr_t)r.bar & (SZ_1G - 1));
	kc_start(kc, KC_WINDOW | KC(KEV_RETRY) | KC(KEV_ZAP));
	for (i = 0; i < nactors; i++) {
		actors[i].r = &r;
		actors[i].started = !pthread_create(&actors[i].thread, NULL, actor_thread,
						    &actors[i]);
		EXPECT_TRUE(actors[i].started);
	}
	dma_loop(_metadata, &r, res, len, off2, rendezvous, iters,
		 now_us() + seconds * 1e6);
	r.stop = true;
	for (i = 0; i < nactors; i++)
		if (actors[i].started)
			pthread_join(actors[i].thread, NULL);
	kc_stop(kc);
	if (r.rendezvous)
		set_delay(0);
	set_command(self, r.on);
	race_note(prefix, res, actors, nactors, kc);
	munmap(r.bar, self->bar_size);
	for (i = 0; i < nactors; i++)
		EXPECT_EQ(0, actors[i].errors)
			TH_LOG("%s: %lu errors, the last %s", act_name[actors[i].act],
			       (unsigned long)actors[i].errors, strerror(actors[i].last_errno));
	EXPECT_EQ(0, res->remap_errors);
	EXPECT_EQ(0, res->other);
	EXPECT_LT(0, res->ok) TH_LOG("no MAP_DMA succeeded");
	EXPECT_EQ(0, res->einval) TH_LOG("MAP_DMA of a valid range failed with EINVAL");
	if (r.rendezvous) {
		EXPECT_LT(0, actors[0].done) TH_LOG("no window was entered");
		if (kc->windows >= 0)
			EXPECT_LT(0, kc->windows) TH_LOG("no fault-in was followed by a look-up");
		/* A toggle in a window undoes the fault-in: the look-up finds nothing. */
		if ((actors[0].act == ACT_TOGGLE || actors[0].act == ACT_UNMAP) &&
		    kc->lost >= 0 && actors[0].done)
			EXPECT_LT(0, kc->lost) TH_LOG("no look-up found its fault-in undone");
	}
}

static void race_run(struct __test_metadata *_metadata, FIXTURE_DATA(lab) *self,
		     const char *prefix, enum bar_at at, unsigned long len,
		     unsigned long off2, bool rendezvous, struct actor *actors,
		     int nactors, struct dma_result *res, struct kcount *kc)
{
	race_run_min(_metadata, self, prefix, at, len, off2, rendezvous, 0, actors,
		     nactors, res, kc);
}

/* Can the BAR hold a PUD leaf where map_bar(BAR_PUD) puts it? */
static bool pud_fits(FIXTURE_DATA(lab) *self)
{
	return !(self->bar_pa & (SZ_1G - 1)) && self->bar_size >= SZ_1G;
}

TEST_F_TIMEOUT(lab, race_pud, 900)
{
	struct actor a[] = { { .act = ACT_TOGGLE } };
	struct dma_result res;
	struct kcount kc;

	if (!pud_fits(self))
		SKIP(return, "the BAR cannot hold a PUD leaf");
	race_run(_metadata, self, "pud", BAR_PUD, env_ul("LAB_RACE_LEN", SZ_2M), 0,
		 true, a, 1, &res, &kc);
}

TEST_F_TIMEOUT(lab, race_pte, 900)
{
	struct actor a[] = { { .act = ACT_TOGGLE } };
	struct dma_result res;
	struct kcount kc;

	race_run(_metadata, self, "pte", BAR_PTE, env_ul("LAB_RACE_PTE_LEN", 16 * SZ_4K), 0,
		 true, a, 1, &res, &kc);
}

/*
 * A lost race whose retry finds the range unmapped: EFAULT, as for any
 * unmapped range, on the odd calls, on which the first actor unmaps; the
 * even ones retry and succeed.  The first actor zaps the first window of
 * each call and then calls munmap(), which waits for the mmap lock that
 * the MAP_DMA thread holds for read in the window.  When the lost race
 * drops the lock, the reader usually takes it straight back (rwsem lets a
 * reader steal it from a writer just woken), but a writer that has waited
 * longer than rwsem's wait timeout (a few ms) may set the hand-off bit,
 * so the second actor zaps the next window too (the retry's), and on that
 * lost race the lock can go to munmap() before the retry looks again.
 * LAB_UNMAP_DELAY_US (20 ms) makes each window longer than that timeout.
 * Not every unmapping call gets there (Documentation/lab.rst has the
 * counts): the test fails only on what does.
 */
TEST_F_TIMEOUT(lab, race_unmap, 900)
{
	struct actor a[] = { { .act = ACT_UNMAP }, { .act = ACT_REZAP } };
	struct dma_result res;
	struct kcount kc;

	if (!pud_fits(self))
		SKIP(return, "the BAR cannot hold a PUD leaf");
	race_run_min(_metadata, self, "unmap", BAR_PUD, env_ul("LAB_RACE_LEN", SZ_2M), 0,
		     true, env_ul("LAB_UNMAP_DELAY_US", 20000), a, 2, &res, &kc);
}

/*
 * Seed 000 end to end: a page walk (smaps, numa_maps) inside each window.
 * Upstream's walker splits the PUD leaf, which for a pfnmap is a zap, and
 * the look-up after the fault-in finds nothing.
 */
TEST_F_TIMEOUT(lab, walk_race, 900)
{
	struct actor a[] = { { .act = ACT_WALK } };
	struct dma_result res;
	struct kcount kc;

	if (!pud_fits(self))
		SKIP(return, "the BAR cannot hold a PUD leaf");
	race_run(_metadata, self, "walk", BAR_PUD, env_ul("LAB_RACE_LEN", SZ_2M), 0,
		 true, a, 1, &res, &kc);
	EXPECT_EQ(0, kc.split_pud) TH_LOG("page walks split (zapped) PUD leaves");
	EXPECT_EQ(0, kc.split_pmd) TH_LOG("page walks split (zapped) PMD leaves");
}

/*
 * mprotect(PROT_NONE) of a whole PUD leaf, and back.  x86's pud_present()
 * does not count _PAGE_PROTNONE (pmd_present() does), so the second call's
 * change_huge_pud() hands a PROT_NONE leaf to pudp_invalidate(), whose
 * VM_WARN_ON_ONCE(!pud_present()) fires: on every kernel, the series does
 * not change it.  A program of its own (tools/lab.d/programs), so that the
 * report is expected there and nowhere else.  The test itself checks that
 * the leaf is usable again afterwards.
 */
TEST_F_TIMEOUT(lab, mprotect_none, 600)
{
	char *p;

	if (!pud_fits(self))
		SKIP(return, "the BAR cannot hold a PUD leaf");
	p = map_bar(self, BAR_PUD);
	ASSERT_NE(NULL, p);
	touch(p, SZ_4K);	/* the PUD leaf */
	ASSERT_EQ(0, mprotect(p, SZ_1G, PROT_NONE)) TH_LOG("%s", strerror(errno));
	ASSERT_EQ(0, mprotect(p, SZ_1G, PROT_READ | PROT_WRITE));
	touch(p, SZ_2M);
	EXPECT_EQ(0, dma_map(self->container, p, LAB_IOVA, SZ_2M));
	EXPECT_EQ(0, dma_unmap(self->container, LAB_IOVA, SZ_2M));
	munmap(p, self->bar_size);
}

/*
 * mprotect() of 2 MiB inside a PUD leaf splits the VMA in the middle of
 * the leaf.  v7.3 splits only PMD leaves at new VMA boundaries, and its
 * change_protection() then meets a PUD leaf that straddles the VMA: the
 * VM_BUG_ON in __split_huge_pud_locked() (series patch 7).  On base this
 * ends the guest, so tools/lab.d/programs runs it last, on its own.
 */
TEST_F_TIMEOUT(lab, mprotect_split, 600)
{
	uint64_t len = 4 * SZ_2M;
	long pud;
	char *p;

	if (!pud_fits(self))
		SKIP(return, "the BAR cannot hold a PUD leaf");
	p = map_bar(self, BAR_PUD);
	ASSERT_NE(NULL, p);
	touch(p, SZ_4K);	/* the PUD leaf */
	pud = vmstat("thp_split_pud");
	ASSERT_EQ(0, mprotect(p + SZ_2M, SZ_2M, PROT_NONE)) TH_LOG("%s", strerror(errno));
	ASSERT_EQ(0, mprotect(p + SZ_2M, SZ_2M, PROT_READ | PROT_WRITE));
	touch(p, len);
	EXPECT_EQ(0, dma_map(self->container, p, LAB_IOVA, len));
	EXPECT_EQ(0, dma_unmap(self->container, LAB_IOVA, len));
	note("mprotect_split_pud=%ld", pud < 0 ? -1L : vmstat("thp_split_pud") - pud);
	munmap(p, self->bar_size);
}

/*
 * Everything else that changes the mapping under MAP_DMA, at once, none
 * in step: errno counts and kernel reports.  EFAULT is expected (memory
 * off, PROT_NONE, no VMA in a remap's gap); EINVAL is a lost race.
 */
TEST_F_TIMEOUT(lab, adversaries, 900)
{
	struct actor a[] = {
		{ .act = ACT_TOGGLE }, { .act = ACT_MPROTECT },
		{ .act = ACT_FORK }, { .act = ACT_REMAP },
	};
	struct dma_result res;
	struct kcount kc;

	if (!pud_fits(self))
		SKIP(return, "the BAR cannot hold a PUD leaf");
	race_run(_metadata, self, "adv", BAR_PUD, env_ul("LAB_RACE_LEN", SZ_2M),
		 self->bar_size / 2 + SZ_2M, false, a, 4, &res, &kc);
}

#ifdef __x86_64__
/*
 * kvm_race: a VMM in a few hundred lines.  The guest runs flat 32-bit
 * protected mode code from a small RAM slot and reads and writes the BAR
 * slot at KVM_BAR_GPA; every 64Ki rounds it reports with an OUT, and a
 * read that does not return what it wrote is reported on another port.
 */
#define KVM_BAR_GPA	0x40000000UL
#define KVM_RAM_SIZE	0x10000UL
#define KVM_CODE	0x1000UL
#define PORT_PROGRESS	0x10
#define PORT_MISMATCH	0x11

static const uint8_t guest_code[] = {
	0xbf, 0x00, 0x00, 0x00, 0x40,		/* mov edi, KVM_BAR_GPA */
	0x31, 0xc9,				/* xor ecx, ecx */
	/* loop: */
	0x41,					/* inc ecx */
	0x89, 0x0f,				/* mov [edi], ecx */
	0x8b, 0x07,				/* mov eax, [edi] */
	0x39, 0xc8,				/* cmp eax, ecx */
	0x75, 0x0e,				/* jne bad */
	0xf7, 0xc1, 0xff, 0xff, 0x00, 0x00,	/* test ecx, 0xffff */
	0x75, 0xef,				/* jnz loop */
	0x89, 0xc8,				/* mov eax, ecx */
	0xe7, PORT_PROGRESS,			/* out PORT_PROGRESS, eax */
	0xeb, 0xe9,				/* jmp loop */
	/* bad: */
	0xe7, PORT_MISMATCH,			/* out PORT_MISMATCH, eax */
	0xeb, 0xe5,				/* jmp loop */
};

struct vm {
	int kvm, vm, vcpu;
	struct kvm_run *run;
	size_t run_size;
	void *ram;
	/* counted by the vCPU thread */
	atomic_ulong reports;
	atomic_ulong efault;
	atomic_ulong eother;
	atomic_ulong mismatch;
	atomic_ulong bad_exit;
	atomic_uint guest_iters;
	atomic_int tid;
	atomic_bool stop;
};

static int vm_create(struct vm *v, void *bar, uint64_t slot_size, const char **why)
{
	struct kvm_userspace_memory_region ram = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = KVM_RAM_SIZE,
	};
	struct kvm_userspace_memory_region barslot = {
		.slot = 1, .guest_phys_addr = KVM_BAR_GPA,
		.memory_size = slot_size, .userspace_addr = (uintptr_t)bar,
	};
	struct kvm_segment seg = {
		.base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 3,
		.present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
	};
	struct kvm_sregs sregs;
	struct kvm_regs regs = { .rip = KVM_CODE, .rflags = 2 };
	int n;

	*why = "/dev/kvm";
	v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (v->kvm < 0)
		return -errno;
	*why = "KVM_CREATE_VM";
	v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
	if (v->vm < 0)
		return -errno;
	v->ram = mmap(NULL, KVM_RAM_SIZE, PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	*why = "guest RAM";
	if (v->ram == MAP_FAILED)
		return -errno;
	memcpy((char *)v->ram + KVM_CODE, guest_code, sizeof(guest_code));
	ram.userspace_addr = (uintptr_t)v->ram;
	*why = "RAM memory slot";
	if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &ram))
		return -errno;
	*why = "BAR memory slot";
	if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &barslot))
		return -errno;
	*why = "KVM_CREATE_VCPU";
	v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
	if (v->vcpu < 0)
		return -errno;
	n = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	*why = "kvm_run";
	if (n <= 0)
		return -EINVAL;
	v->run_size = n;
	v->run = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
	if (v->run == MAP_FAILED)
		return -errno;
	*why = "KVM_GET_SREGS";
	if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs))
		return -errno;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
	seg.type = 11;
	seg.selector = 0x08;
	sregs.cs = seg;
	sregs.cr0 |= 1;	/* protected mode, no paging */
	*why = "KVM_SET_SREGS";
	if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs))
		return -errno;
	*why = "KVM_SET_REGS";
	if (ioctl(v->vcpu, KVM_SET_REGS, &regs))
		return -errno;
	return 0;
}

static void vm_destroy(struct vm *v)
{
	if (v->run && v->run != MAP_FAILED)
		munmap(v->run, v->run_size);
	if (v->vcpu > 0)
		close(v->vcpu);
	if (v->vm > 0)
		close(v->vm);
	if (v->kvm > 0)
		close(v->kvm);
	if (v->ram && v->ram != MAP_FAILED)
		munmap(v->ram, KVM_RAM_SIZE);
}

static void *vcpu_thread(void *arg)
{
	struct vm *v = arg;
	struct kvm_run *run = v->run;

	prctl(PR_SET_NAME, "lab-vcpu");
	v->tid = syscall(SYS_gettid);
	while (!v->stop) {
		if (ioctl(v->vcpu, KVM_RUN, 0)) {
			if (errno == EFAULT)
				v->efault++;	/* a VMM would stop the guest */
			else if (errno != EINTR && errno != EAGAIN)
				v->eother++;
			continue;
		}
		if (run->exit_reason != KVM_EXIT_IO) {
			v->bad_exit++;
			fprintf(stderr, "# kvm_race: exit reason %u\n", run->exit_reason);
			break;
		}
		if (run->io.port == PORT_PROGRESS) {
			v->guest_iters = *(uint32_t *)((char *)run + run->io.data_offset);
			v->reports++;
		} else {
			v->mismatch++;
		}
	}
	return NULL;
}

struct kvm_toggle {
	FIXTURE_DATA(lab) *self;
	struct vm *v;
	void *bar;
	bool rendezvous;	/* zap only inside the window */
	bool lockstep;		/* zap every window, do not wait for progress */
	unsigned long toggle_us, max_toggles;
	double end;
	atomic_ulong toggles;
	atomic_ulong errors;
};

static void *kvm_toggler(void *arg)
{
	struct kvm_toggle *t = arg;
	uint16_t cmd, off_cmd;
	unsigned long seen;

	if (memory_cmds(t->self, &cmd, &off_cmd)) {
		t->errors++;
		return NULL;
	}
	while (!t->v->stop && t->toggles < t->max_toggles && now_us() < t->end) {
		seen = t->v->reports;
		if (t->rendezvous) {
			/*
			 * Make the vCPU fault without turning memory off: map
			 * the BAR again in place.  The munmap() invalidates the
			 * guest's mapping, and its next access faults the new
			 * VMA in.  (A first toggle would do it too, but the
			 * fault would then find memory off: a genuine error.)
			 * In lockstep, each lost race faults again by itself.
			 */
			if ((!t->lockstep || !t->toggles) &&
			    mmap(t->bar, t->self->bar_size, PROT_READ | PROT_WRITE,
				 MAP_SHARED | MAP_FIXED, t->self->device,
				 t->self->bar_off) != t->bar) {
				t->errors++;
				break;
			}
			/* Wait for the vCPU to be between fault-in and look-up. */
			while (!in_window(t->v->tid) && !t->v->stop && now_us() < t->end)
				sched_yield();
			if (t->v->stop || now_us() >= t->end)
				break;
		}
		if (set_command(t->self, off_cmd) || set_command(t->self, cmd))
			t->errors++;
		t->toggles++;
		if (t->lockstep)
			continue;
		if (t->rendezvous) {
			/* Let the guest make progress before the next window. */
			while (t->v->reports == seen && !t->v->stop && now_us() < t->end)
				sched_yield();
		} else {
			usleep(t->toggle_us);
		}
	}
	if (set_command(t->self, cmd))
		t->errors++;
	return NULL;
}

/*
 * Run the guest with the toggler until @toggles toggles or @seconds; in
 * lockstep mode, until killed.  Returns 0, or -errno with *why set.
 */
static int run_vm(FIXTURE_DATA(lab) *self, struct vm *v, struct kvm_toggle *t,
		  void *bar, uint64_t slot_size, const char **why)
{
	pthread_t vt, tt;
	int ret;

	ret = vm_create(v, bar, slot_size, why);
	if (ret)
		return ret;
	t->self = self;
	t->v = v;
	t->bar = bar;
	*why = "pthread_create";
	if (pthread_create(&vt, NULL, vcpu_thread, v))
		return -EAGAIN;
	/* Let the guest warm up: first faults, first report. */
	while (!v->reports && now_us() < t->end && !v->bad_exit)
		sched_yield();
	if (pthread_create(&tt, NULL, kvm_toggler, t)) {
		v->stop = true;
		pthread_join(vt, NULL);
		return -EAGAIN;
	}
	pthread_join(tt, NULL);
	/* A last report after the toggler stopped: the guest still runs. */
	ret = v->reports;
	while (v->reports == (unsigned long)ret && now_us() < t->end + 5e6 && !v->bad_exit)
		sched_yield();
	v->stop = true;
	pthread_join(vt, NULL);
	return 0;
}

/*
 * A genuine error still reaches user space: with memory off the fault is
 * refused (SIGBUS) with no invalidation racing it, so KVM_RUN must fail
 * with EFAULT rather than retry for ever.  Returns the milliseconds from
 * turning memory off to the first EFAULT, or -1.
 */
static double vm_memory_off(FIXTURE_DATA(lab) *self, void *bar,
			    uint64_t slot_size, unsigned long *efault,
			    const char **why)
{
	struct vm v = { 0 };
	uint16_t cmd, off_cmd;
	double t0, ms = -1;
	pthread_t vt;

	*efault = 0;
	if (vm_create(&v, bar, slot_size, why))
		goto out;
	*why = "pthread_create";
	if (pthread_create(&vt, NULL, vcpu_thread, &v))
		goto out;
	t0 = now_us();
	while (!v.reports && !v.bad_exit && now_us() < t0 + 30e6)
		sched_yield();
	*why = "PCI_COMMAND";
	if (!memory_cmds(self, &cmd, &off_cmd)) {
		t0 = now_us();
		if (!set_command(self, off_cmd)) {
			while (!v.efault && !v.bad_exit && now_us() < t0 + 10e6)
				sched_yield();
			if (v.efault)
				ms = (now_us() - t0) / 1e3;
		}
		v.stop = true;
		/* Memory on again: the vCPU gets out at its next report. */
		if (set_command(self, cmd))
			ms = -1;
	}
	v.stop = true;
	pthread_join(vt, NULL);
	*efault = v.efault;
out:
	vm_destroy(&v);
	return ms;
}

TEST_F_TIMEOUT(lab, kvm_race, 900)
{
	unsigned long seconds = env_ul("LAB_KVM_SECONDS", 20);
	unsigned long delay = env_ul("LAB_RACE_DELAY_US", 0) ?
			      env_ul("LAB_KVM_DELAY_US", 20000) : 0;
	uint64_t slot_size = self->bar_size < SZ_1G ? self->bar_size : SZ_1G;
	struct vm v = { 0 };
	struct kvm_toggle t = { 0 };
	struct kcount kc;
	long errpfn;
	unsigned long off_efault;
	const char *why = "";
	double kill_ms, off_ms;
	char *bar;
	int ret, status;
	pid_t pid;

	bar = map_bar(self, BAR_PUD);
	ASSERT_NE(NULL, bar);
	t.rendezvous = delay && !set_delay(delay);
	t.toggle_us = env_ul("LAB_TOGGLE_US", 3000);
	t.max_toggles = env_ul("LAB_KVM_TOGGLES", 100);
	t.end = now_us() + seconds * 1e6;
	note("kvm_mode=%s kvm_delay_us=%lu kvm_slot_mib=%lu",
	     t.rendezvous ? "rendezvous" : "timed", t.rendezvous ? delay : 0,
	     (unsigned long)(slot_size >> 20));
	kc_start(&kc, KC_WINDOW | KC(KEV_ZAP) | KC(KEV_ERRPFN) | KC(KEV_SIGBUS));
	ret = run_vm(self, &v, &t, bar, slot_size, &why);
	kc_stop(&kc);
	errpfn = kc.n[KEV_ERRPFN];
	ASSERT_EQ(0, ret) TH_LOG("%s: %s", why, strerror(-ret));
	/* Error pfns that KVM_RUN did not report were retried. */
	note("kvm_toggles=%lu kvm_reports=%lu kvm_guest_iters=%u kvm_run_efault=%lu kvm_run_other=%lu kvm_mismatch=%lu kvm_bad_exit=%lu kvm_zaps=%ld kvm_errpfn=%ld kvm_sigbus=%ld kvm_retried=%ld kvm_windows=%ld kvm_lost=%ld",
	     (unsigned long)t.toggles, (unsigned long)v.reports,
	     (unsigned int)v.guest_iters, (unsigned long)v.efault,
	     (unsigned long)v.eother, (unsigned long)v.mismatch,
	     (unsigned long)v.bad_exit, kc.n[KEV_ZAP], errpfn, kc.n[KEV_SIGBUS],
	     errpfn < 0 ? -1L : errpfn - (long)v.efault, kc.windows, kc.lost);
	vm_destroy(&v);

	off_ms = vm_memory_off(self, bar, slot_size, &off_efault, &why);
	note("kvm_off_efault=%lu kvm_off_efault_ms=%.1f", off_efault, off_ms);

	/*
	 * SIGKILL while the toggler zaps every window: a VMM whose vCPU can
	 * only lose the race must still die at once.
	 */
	pid = fork();
	ASSERT_LE(0, pid);
	if (!pid) {
		struct vm cv = { 0 };
		struct kvm_toggle ct = { .rendezvous = t.rendezvous,
					 .lockstep = true, .toggle_us = 0,
					 .max_toggles = ULONG_MAX,
					 .end = now_us() + 600e6 };

		run_vm(self, &cv, &ct, bar, slot_size, &why);
		_exit(1);
	}
	usleep(2000000);
	kill_ms = now_us();
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	kill_ms = (now_us() - kill_ms) / 1e3;
	note("kvm_sigkill_ms=%.1f", kill_ms);
	if (t.rendezvous)
		set_delay(0);
	munmap(bar, self->bar_size);

	EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
	EXPECT_GT(5000.0, kill_ms) TH_LOG("the VMM took %.0f ms to die", kill_ms);
	EXPECT_EQ(0, t.errors);
	EXPECT_EQ(0, v.bad_exit);
	EXPECT_EQ(0, v.eother);
	EXPECT_LT(1, v.reports) TH_LOG("the guest did not run");
	EXPECT_EQ(0, v.mismatch) TH_LOG("the guest read back what it did not write");
	if (t.rendezvous) {
		EXPECT_LT(0, t.toggles) TH_LOG("no window was entered");
		/* And in the kernel: a zap in the window fails the look-up. */
		if (errpfn >= 0)
			EXPECT_LT(0, errpfn) TH_LOG("no look-up failed after a fault-in");
	}
	EXPECT_EQ(0, v.efault) TH_LOG("KVM_RUN failed with EFAULT");
	EXPECT_LT(0, off_efault)
		TH_LOG("memory off: KVM_RUN did not fail (%s)", why);
}
#endif /* __x86_64__ */

int main(int argc, char **argv)
{
	int i;

	/*
	 * One malloc arena: no thread maps an arena of its own in the gap a
	 * remap leaves in the BAR's place (adversaries).
	 */
	mallopt(M_ARENA_MAX, 1);
	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--")) {
			if (i + 1 < argc)
				bdf = argv[i + 1];
			if (i + 2 < argc)
				bar_index = atoi(argv[i + 2]);
			argc = i;
			break;
		}
	}
	return test_harness_run(argc, argv);
}
