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
 *   race            one thread VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA in
 *                   a loop, one toggling PCI_COMMAND_MEMORY through the
 *                   config region (vfio-pci zaps the BAR mappings on
 *                   disable), one reading /proc/self/smaps.  A valid range
 *                   must never fail with EINVAL; EBUSY (the retry bound
 *                   was hit) is retried, EFAULT (memory was disabled at
 *                   the fault) is counted, and the next call waits for
 *                   the toggler to enable memory again.
 *
 * Usage: vfio_pfnmap_lab [harness options] -- BDF [BAR]
 * Environment (all optional): LAB_RACE_ITERS (400), LAB_RACE_SECONDS (40),
 * LAB_RACE_LEN (2 MiB), LAB_TOGGLE_US (3000), LAB_RACE_DELAY_US (0: if
 * set and the kernel has /sys/module/kernel/parameters/mm_race_delay_us,
 * the lab-only patch, the window between fault-in and look-up is widened
 * by that much during the race test).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
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
#include <sys/resource.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>

#include "kselftest_harness.h"

#define SZ_4K		0x1000UL
#define SZ_2M		0x200000UL
#define SZ_1G		0x40000000UL
#define LAB_IOVA	(1UL << 36)
#define DELAY_KNOB	"/sys/module/kernel/parameters/mm_race_delay_us"

static const char *bdf;
static int bar_index = 2;

static void note(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("# lab: ");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	fflush(stdout);
}

static unsigned long env_ul(const char *name, unsigned long def)
{
	const char *s = getenv(name);

	return s && *s ? strtoul(s, NULL, 0) : def;
}

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

/* Read all of /proc/self/smaps into a buffer touched beforehand. */
static char smaps_buf[65536];

static int read_smaps(void)
{
	int fd = open("/proc/self/smaps", O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	do
		n = read(fd, smaps_buf, sizeof(smaps_buf));
	while (n > 0);
	close(fd);
	return n < 0 ? -errno : 0;
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

static void *map_bar(struct __test_metadata *_metadata,
		     FIXTURE_DATA(lab) *self, bool by_hand)
{
	void *want = NULL, *p;
	char *r;

	if (by_hand) {
		/* What QEMU and the vfio selftests do: reserve, then align. */
		r = mmap(NULL, self->bar_size + SZ_1G, PROT_NONE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (r == MAP_FAILED)
			return NULL;
		want = (void *)(((uintptr_t)r + SZ_1G - 1 - (self->bar_pa & (SZ_1G - 1))) &
				~(SZ_1G - 1)) + (self->bar_pa & (SZ_1G - 1));
		if ((char *)want < r)
			want = (char *)want + SZ_1G;
	}
	p = mmap(want, self->bar_size, PROT_READ | PROT_WRITE,
		 MAP_SHARED | (want ? MAP_FIXED : 0), self->device, self->bar_off);
	return p == MAP_FAILED ? NULL : p;
}

TEST_F(lab, placement)
{
	uint64_t mask = self->bar_size >= SZ_1G ? SZ_1G - 1 : SZ_2M - 1;
	char *p = map_bar(_metadata, self, false);

	ASSERT_NE(NULL, p);
	note("bar_size=%lu bar_pa=0x%lx mmap_null=%p va_mod_1g=0x%lx pa_mod_1g=0x%lx",
	     self->bar_size, self->bar_pa, p, (uintptr_t)p & (SZ_1G - 1),
	     self->bar_pa & (SZ_1G - 1));
	EXPECT_EQ(self->bar_pa & mask, (uintptr_t)p & mask);
	munmap(p, self->bar_size);
}

TEST_F_TIMEOUT(lab, touch_faults, 600)
{
	char *p = map_bar(_metadata, self, false);
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
	char *p = map_bar(_metadata, self, true);
	long f;

	ASSERT_NE(NULL, p);
	memset(smaps_buf, 0, sizeof(smaps_buf));
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
	char *p = map_bar(_metadata, self, false);
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

struct race {
	FIXTURE_DATA(lab) *self;
	unsigned long toggle_us;
	atomic_bool stop;
	atomic_ulong toggles;
	atomic_ulong smaps_reads;
	atomic_ulong toggle_errors;
};

static void *toggler(void *arg)
{
	struct race *r = arg;
	off_t off = r->self->cfg_off + PCI_COMMAND;
	uint16_t cmd, off_cmd;

	if (pread(r->self->device, &cmd, 2, off) != 2) {
		r->toggle_errors++;
		return NULL;
	}
	cmd |= PCI_COMMAND_MEMORY;
	off_cmd = cmd & ~PCI_COMMAND_MEMORY;
	while (!r->stop) {
		/* vfio-pci zaps every mmap of the BARs on this write */
		if (pwrite(r->self->device, &off_cmd, 2, off) != 2 ||
		    pwrite(r->self->device, &cmd, 2, off) != 2)
			r->toggle_errors++;
		r->toggles++;	/* memory is enabled again */
		usleep(r->toggle_us);
	}
	if (pwrite(r->self->device, &cmd, 2, off) != 2)
		r->toggle_errors++;
	return NULL;
}

/*
 * EFAULT: the fault found memory disabled.  Wait for the toggler's next
 * round instead of calling again at once, so that the calls are spent on
 * the race rather than on a BAR that is off.
 */
static void wait_toggle(struct race *r, double end)
{
	unsigned long seen = r->toggles;

	while (r->toggles == seen && now_us() < end)
		sched_yield();
}

static void *smaps_reader(void *arg)
{
	struct race *r = arg;

	while (!r->stop) {
		read_smaps();
		r->smaps_reads++;
	}
	return NULL;
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

TEST_F_TIMEOUT(lab, race, 900)
{
	unsigned long iters = env_ul("LAB_RACE_ITERS", 400);
	unsigned long seconds = env_ul("LAB_RACE_SECONDS", 40);
	unsigned long len = env_ul("LAB_RACE_LEN", SZ_2M);
	unsigned long delay = env_ul("LAB_RACE_DELAY_US", 0);
	unsigned long n = 0, ok = 0, einval = 0, ebusy = 0, efault = 0;
	unsigned long other = 0, gave_up = 0, tries, max_tries = 0;
	struct race r = { .self = self };
	pthread_t t1, t2;
	double end;
	char *p;
	int ret;

	r.toggle_us = env_ul("LAB_TOGGLE_US", 3000);
	if (len > self->bar_size)
		len = self->bar_size;
	p = map_bar(_metadata, self, false);
	ASSERT_NE(NULL, p);
	if (delay) {
		ret = set_delay(delay);
		note("race_delay_us=%lu (%s)", ret ? 0 : delay,
		     ret ? "kernel has no mm_race_delay_us: window not widened" :
			   "window widened");
	}
	ASSERT_EQ(0, pthread_create(&t1, NULL, toggler, &r));
	ASSERT_EQ(0, pthread_create(&t2, NULL, smaps_reader, &r));

	end = now_us() + seconds * 1e6;
	while (n < iters && now_us() < end) {
		n++;
		for (tries = 1; ; tries++) {
			ret = dma_map(self->container, p, LAB_IOVA, len);
			if (ret != -EBUSY)
				break;
			ebusy++;
			if (tries == 100) {
				gave_up++;
				break;
			}
		}
		if (tries > max_tries)
			max_tries = tries;
		switch (ret) {
		case 0:
			ok++;
			if (dma_unmap(self->container, LAB_IOVA, len))
				other++;
			break;
		case -EINVAL:
			einval++;
			break;
		case -EFAULT:
			efault++;
			wait_toggle(&r, end);
			break;
		case -EBUSY:
			break;
		default:
			other++;
			TH_LOG("MAP_DMA: %s", strerror(-ret));
		}
	}
	r.stop = true;
	pthread_join(t1, NULL);
	pthread_join(t2, NULL);
	if (delay)
		set_delay(0);
	note("race iterations=%lu ok=%lu einval=%lu ebusy=%lu efault=%lu other=%lu gave_up=%lu max_tries=%lu toggles=%lu smaps_reads=%lu",
	     n, ok, einval, ebusy, efault, other, gave_up, max_tries,
	     (unsigned long)r.toggles, (unsigned long)r.smaps_reads);
	munmap(p, self->bar_size);
	EXPECT_EQ(0, r.toggle_errors);
	EXPECT_LT(0, ok) TH_LOG("no MAP_DMA succeeded: the race was not run");
	EXPECT_EQ(0, other);
	EXPECT_EQ(0, gave_up);
	EXPECT_EQ(0, einval) TH_LOG("MAP_DMA of a valid range failed with EINVAL");
}

int main(int argc, char **argv)
{
	int i;

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
