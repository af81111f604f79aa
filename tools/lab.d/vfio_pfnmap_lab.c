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
 *   kvm_race        (x86_64) a KVM guest whose memory slot is the BAR,
 *                   mapped by hand for PUD leaves, reads and writes it in a
 *                   loop while memory is toggled as above.  With the lab's
 *                   delay each round maps the BAR again in place (so that
 *                   the vCPU faults with memory on), waits until the vCPU
 *                   thread sleeps in that delay, i.e. between fault-in and
 *                   look-up, and only then zaps: each toggle enters the
 *                   window once.  Without it, memory is toggled every
 *                   LAB_TOGGLE_US and faults may find memory off.  KVM_RUN
 *                   must never fail, the guest must never read back what
 *                   it did not write, and SIGKILL must end the VMM promptly
 *                   while the toggler zaps every window; and with memory
 *                   off, KVM_RUN must still fail with EFAULT (a genuine
 *                   error is not retried for ever).  Counted in the
 *                   kernel with kprobe events: zaps, error pfns from the
 *                   fault-in, and device faults refused (memory off).
 *
 * Usage: vfio_pfnmap_lab [harness options] -- BDF [BAR]
 * Environment (all optional): LAB_RACE_ITERS (400), LAB_RACE_SECONDS (40),
 * LAB_RACE_LEN (2 MiB), LAB_TOGGLE_US (3000), LAB_RACE_DELAY_US (0: if
 * set and the kernel has /sys/module/kernel/parameters/mm_race_delay_us,
 * the lab-only patch, the window between fault-in and look-up is widened
 * by that much during the race test), LAB_KVM_SECONDS (20), LAB_KVM_TOGGLES
 * (100), LAB_KVM_DELAY_US (20000: the window of kvm_race, which must be
 * longer than a toggle; used only where LAB_RACE_DELAY_US is set).
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
	uint16_t cmd, off_cmd;

	if (memory_cmds(r->self, &cmd, &off_cmd)) {
		r->toggle_errors++;
		return NULL;
	}
	while (!r->stop) {
		if (set_command(r->self, off_cmd) || set_command(r->self, cmd))
			r->toggle_errors++;
		r->toggles++;	/* memory is enabled again */
		usleep(r->toggle_us);
	}
	if (set_command(r->self, cmd))
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
#define TRACEFS		"/sys/kernel/tracing"

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

/* tracefs kprobe events: counted in the kernel, nothing added to it. */
static const char *const kprobe_defs[] = {
	"p:lab/zap vfio_pci_zap_and_down_write_memory_lock",
	"r:lab/errpfn __kvm_faultin_pfn ret=$retval:x64",
	"r:lab/sigbus vfio_pci_mmap_huge_fault ret=$retval:x32",
};

static const char *const kprobe_filters[][2] = {
	{ "errpfn", "ret == 0x7ff0000000000000" },	/* KVM_PFN_ERR_FAULT */
	{ "sigbus", "ret == 2" },			/* VM_FAULT_SIGBUS */
};

static int tracefs_write(const char *file, const char *text, bool append)
{
	char path[256];
	int fd, ret = 0;

	snprintf(path, sizeof(path), TRACEFS "/%s", file);
	fd = open(path, O_WRONLY | (append ? O_APPEND : O_TRUNC));
	if (fd < 0)
		return -errno;
	if (write(fd, text, strlen(text)) < 0)
		ret = -errno;
	close(fd);
	return ret;
}

static int kprobes_start(void)
{
	char file[128];
	unsigned int i;
	int ret;

	if (access(TRACEFS "/kprobe_events", W_OK))
		mount("tracefs", TRACEFS, "tracefs", 0, NULL);
	tracefs_write("events/lab/enable", "0", false);
	ret = tracefs_write("kprobe_events", "", false);
	for (i = 0; !ret && i < sizeof(kprobe_defs) / sizeof(kprobe_defs[0]); i++)
		ret = tracefs_write("kprobe_events", kprobe_defs[i], true);
	for (i = 0; !ret && i < 2; i++) {
		snprintf(file, sizeof(file), "events/lab/%s/filter", kprobe_filters[i][0]);
		ret = tracefs_write(file, kprobe_filters[i][1], false);
	}
	if (!ret)
		ret = tracefs_write("buffer_size_kb", "4096", false);
	if (!ret)
		ret = tracefs_write("trace", "", false);
	if (!ret)
		ret = tracefs_write("events/lab/enable", "1", false);
	return ret;
}

/* Count each lab event in the trace buffer; -1 where there is none. */
static void kprobes_stop(long *zaps, long *errpfn, long *sigbus)
{
	char line[512];
	FILE *f;

	*zaps = *errpfn = *sigbus = -1;
	if (tracefs_write("events/lab/enable", "0", false))
		return;
	f = fopen(TRACEFS "/trace", "r");
	if (!f)
		return;
	*zaps = *errpfn = *sigbus = 0;
	while (fgets(line, sizeof(line), f)) {
		if (line[0] == '#')
			continue;
		if (strstr(line, " zap: "))
			(*zaps)++;
		else if (strstr(line, " errpfn: "))
			(*errpfn)++;
		else if (strstr(line, " sigbus: "))
			(*sigbus)++;
	}
	fclose(f);
	tracefs_write("kprobe_events", "", false);
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
	long zaps, errpfn, sigbus;
	unsigned long off_efault;
	const char *why = "";
	double kill_ms, off_ms;
	char *bar;
	int ret, status;
	pid_t pid;

	bar = map_bar(_metadata, self, true);
	ASSERT_NE(NULL, bar);
	t.rendezvous = delay && !set_delay(delay);
	t.toggle_us = env_ul("LAB_TOGGLE_US", 3000);
	t.max_toggles = env_ul("LAB_KVM_TOGGLES", 100);
	t.end = now_us() + seconds * 1e6;
	note("kvm_mode=%s kvm_delay_us=%lu kvm_slot_mib=%lu",
	     t.rendezvous ? "rendezvous" : "timed", t.rendezvous ? delay : 0,
	     (unsigned long)(slot_size >> 20));
	ret = kprobes_start();
	if (ret)
		TH_LOG("kprobe events unavailable (%s): no kernel counts", strerror(-ret));

	ret = run_vm(self, &v, &t, bar, slot_size, &why);
	kprobes_stop(&zaps, &errpfn, &sigbus);
	ASSERT_EQ(0, ret) TH_LOG("%s: %s", why, strerror(-ret));
	/* Error pfns that KVM_RUN did not report were retried. */
	note("kvm_toggles=%lu kvm_reports=%lu kvm_guest_iters=%u kvm_run_efault=%lu kvm_run_other=%lu kvm_mismatch=%lu kvm_bad_exit=%lu kvm_zaps=%ld kvm_errpfn=%ld kvm_sigbus=%ld kvm_retried=%ld",
	     (unsigned long)t.toggles, (unsigned long)v.reports,
	     (unsigned int)v.guest_iters, (unsigned long)v.efault,
	     (unsigned long)v.eother, (unsigned long)v.mismatch,
	     (unsigned long)v.bad_exit, zaps, errpfn, sigbus,
	     errpfn < 0 ? -1L : errpfn - (long)v.efault);
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
