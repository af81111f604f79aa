// SPDX-License-Identifier: GPL-2.0
/*
 * hmm_lab: migration to device memory with fault-in in one walk
 * (series/mainline patches 32-35), end to end, through test_hmm.
 *
 * Runs in the guest of tools/lab, after /init has loaded test_hmm.ko, and
 * prints its numbers as "# lab: key=value" lines.  Needs the command
 * HMM_DMIRROR_MIGRATE_FAULT of the series' test_hmm; skips without it (the
 * base kernel).
 *
 *   race   Matthew Brost's recipe: CPU threads touch a 2 MiB range
 *          (writes and MADV_DONTNEED, munmap() and mmap() of parts of it
 *          in place, mprotect() of another part read-only and back) while
 *          the device side migrates all of it, again and again, with
 *          compound collection off and all-or-nothing (a chunk not
 *          collected whole is given back with migrate_vma_pages() and
 *          migrate_vma_finalize(), as Brost's driver does).  A migration
 *          entry left behind makes the next CPU access of its page wait
 *          for ever.  The range is touched in a child process watched
 *          from here: if a thread makes no progress for LAB_HMM_HANG_S
 *          seconds, the test fails (and leaves the stuck child, which no
 *          signal can end; the hung task detector is switched off so that
 *          the hang is reported once, here).  At the end every page is
 *          read again and the pages only the writer writes must hold what
 *          it wrote last.  Counted: calls, calls that a CPU thread raced
 *          (its counter moved during the call), chunks given back whole,
 *          errors.  On the lab's mutant kernel (the v1 split of the walk
 *          into handle and prepare, kunit/mutant-patches/
 *          hmm-split-prepare.patch) the windows of the split it entered
 *          are read from its parameter.
 *   bench  Page-table walks, faults and wall time of migrating 64 MiB with
 *          half of it not present, today's two calls (hmm_range_fault(),
 *          then migrate_vma_setup()) side by side with one call of
 *          migrate_vma_setup() with MIGRATE_VMA_FAULT and of
 *          hmm_range_fault() with HMM_PFN_REQ_MIGRATE.  "holes": every
 *          other page never touched; "cow": every other page shared
 *          with a child (read-only, to be written).  Walks are kprobe hits
 *          of walk_page_range() and walk_page_range_vma(), faults of
 *          handle_mm_fault() (tracefs kprobe_profile).  No time is
 *          asserted.
 *
 * Environment: LAB_RACE_ITERS (400: calls of race), LAB_RACE_SECONDS (20:
 * its time bound), LAB_HMM_HANG_S (10), LAB_HMM_BENCH_MB (64).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/wait.h>

#include "kselftest_harness.h"
#include "lab_common.h"
#include <lib/test_hmm_uapi.h>

#define SZ_2M		(2UL << 20)
#define MUTANT_WINDOWS	"/sys/module/migrate_device/parameters/hmm_split_windows"

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long read_long(const char *path)
{
	char buf[64];
	long v = -1;
	int fd, n;

	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	if (n > 0) {
		buf[n] = 0;
		v = strtol(buf, NULL, 0);
	}
	close(fd);
	return v;
}

/* 0, or -errno of the ioctl; -EOPNOTSUPP for a kernel without it. */
static int migrate_fault(int fd, void *addr, unsigned long len,
			 unsigned long flags, struct hmm_dmirror_migrate_cmd *out)
{
	struct hmm_dmirror_migrate_cmd cmd = {
		.addr = (uintptr_t)addr,
		.npages = len / getpagesize(),
		.flags = flags,
	};
	int ret;

	do {
		ret = ioctl(fd, HMM_DMIRROR_MIGRATE_FAULT, &cmd);
	} while (ret && errno == EINTR);
	if (out)
		*out = cmd;
	return ret ? -errno : 0;
}

/* A 2 MiB aligned anonymous range of @len bytes. */
static char *map_aligned(unsigned long len)
{
	char *p = mmap(NULL, len + SZ_2M, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *a;

	if (p == MAP_FAILED)
		return NULL;
	a = (char *)(((uintptr_t)p + SZ_2M - 1) & ~(SZ_2M - 1));
	if (a > p)
		munmap(p, a - p);
	munmap(a + len, p + SZ_2M - a);
	return a;
}

static bool supported(int fd)
{
	char *p = map_aligned(SZ_2M);
	int ret;

	if (!p)
		return false;
	p[0] = 1;
	ret = migrate_fault(fd, p, getpagesize(), 0, NULL);
	munmap(p, SZ_2M);
	return ret != -EINVAL;
}

/* The device, or -1 and why not: the tests skip on a kernel without it. */
static int open_dmirror(const char **why)
{
	int fd = open("/dev/hmm_dmirror0", O_RDWR);

	if (fd < 0) {
		*why = "no /dev/hmm_dmirror0 (test_hmm not loaded)";
		return -1;
	}
	if (!supported(fd)) {
		close(fd);
		*why = "test_hmm has no HMM_DMIRROR_MIGRATE_FAULT";
		return -1;
	}
	return fd;
}

/*
 * The race.  The region: pages [0, A) written by the writer only, [A, B)
 * remapped by the remapper, [B, N) mprotect()ed by the protector.
 */
#define NPAGES		512
#define A_END		256
#define B_END		384
#define REMAP_PAGES	16
enum { T_DEVICE, T_WRITER, T_REMAPPER, T_PROTECTOR, NTHREADS };
static const char *const tname[NTHREADS] = { "device", "writer", "remapper", "protector" };

struct race_state {
	volatile long beat[NTHREADS];	/* progress of each thread */
	volatile int stop;		/* the device side is done */
	volatile int done;		/* the final read is done */
	long calls, raced, aborts, migrated, errors, einval, final_bad;
	int err;			/* first unexpected errno */
};

static struct race_state *rs;
static char *region;
static long pgsz;
static unsigned int shadow[A_END];

static void *writer(void *arg)
{
	unsigned int seed = 1, v = 0;

	while (!rs->stop) {
		unsigned int p = rand_r(&seed) % A_END;

		if (rand_r(&seed) % 64 == 0) {
			madvise(region + p * pgsz, pgsz, MADV_DONTNEED);
			shadow[p] = 0;
		} else {
			shadow[p] = ++v;
			*(volatile unsigned int *)(region + p * pgsz) = v;
		}
		rs->beat[T_WRITER]++;
	}
	return NULL;
}

static void *remapper(void *arg)
{
	unsigned int seed = 2;

	while (!rs->stop) {
		unsigned int p = A_END + rand_r(&seed) % (B_END - A_END - REMAP_PAGES + 1);
		char *a = region + p * pgsz;
		unsigned int i;

		if (mmap(a, REMAP_PAGES * pgsz, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
			_exit(4);
		/* Fill the holes, and touch the whole part again. */
		for (i = 0; i < REMAP_PAGES; i++)
			*(volatile unsigned int *)(a + i * pgsz) = p + i;
		for (i = A_END; i < B_END; i++)
			(void)*(volatile unsigned int *)(region + i * pgsz);
		rs->beat[T_REMAPPER]++;
	}
	return NULL;
}

static void *protector(void *arg)
{
	char *c = region + B_END * pgsz;
	unsigned long len = (NPAGES - B_END) * pgsz;
	unsigned int i;

	while (!rs->stop) {
		mprotect(c, len, PROT_READ);
		for (i = 0; i < NPAGES - B_END; i++)
			(void)*(volatile unsigned int *)(c + i * pgsz);
		mprotect(c, len, PROT_READ | PROT_WRITE);
		for (i = 0; i < NPAGES - B_END; i += 8)
			*(volatile unsigned int *)(c + i * pgsz) = i;
		rs->beat[T_PROTECTOR]++;
	}
	return NULL;
}

static void race_child(unsigned long iters, double seconds)
{
	static void *(*const fn[NTHREADS])(void *) = {
		NULL, writer, remapper, protector,
	};
	pthread_t t[NTHREADS];
	double end = now_s() + seconds;
	unsigned long i;
	int k, fd;

	/* test_hmm mirrors the mm of the process that opens it */
	fd = open("/dev/hmm_dmirror0", O_RDWR);
	if (fd < 0)
		_exit(3);
	region = map_aligned(SZ_2M);
	if (!region)
		_exit(3);
	madvise(region, SZ_2M, MADV_NOHUGEPAGE);
	memset(region, 0, SZ_2M);
	for (k = 1; k < NTHREADS; k++)
		pthread_create(&t[k], NULL, fn[k], NULL);

	for (i = 0; i < iters && now_s() < end; i++) {
		struct hmm_dmirror_migrate_cmd out;
		long before[NTHREADS], moved = 0;
		int ret;

		for (k = 1; k < NTHREADS; k++)
			before[k] = rs->beat[k];
		/* Both ways into the one walk, in turn. */
		ret = migrate_fault(fd, region, SZ_2M,
				    HMM_DMIRROR_MIGRATE_NO_COMPOUND |
				    HMM_DMIRROR_MIGRATE_ALL |
				    (i % 2 ? HMM_DMIRROR_MIGRATE_HMM : 0), &out);
		for (k = 1; k < NTHREADS; k++)
			moved |= rs->beat[k] != before[k];
		rs->calls++;
		rs->raced += !!moved;
		if (ret == 0) {
			rs->aborts += out.aborts;
			rs->migrated += out.cpages;
		} else if (ret == -EINVAL) {
			/* a remap gap: no VMA at a chunk's start */
			rs->einval++;
		} else {
			rs->errors++;
			if (!rs->err)
				rs->err = -ret;
		}
		rs->beat[T_DEVICE]++;
	}
	rs->stop = 1;
	for (k = 1; k < NTHREADS; k++)
		pthread_join(t[k], NULL);

	/* Every page once more; a migration entry left behind hangs here. */
	mprotect(region, SZ_2M, PROT_READ | PROT_WRITE);
	for (i = 0; i < NPAGES; i++) {
		unsigned int v = *(volatile unsigned int *)(region + i * pgsz);

		if (i < A_END && v != shadow[i])
			rs->final_bad++;
		rs->beat[T_DEVICE]++;
	}
	rs->done = 1;
	_exit(0);
}

TEST(race)
{
	unsigned long iters = env_ul("LAB_RACE_ITERS", 400);
	double seconds = env_ul("LAB_RACE_SECONDS", 20);
	double hang_s = env_ul("LAB_HMM_HANG_S", 10);
	long last[NTHREADS] = { 0 }, windows0, windows;
	double seen[NTHREADS], t;
	const char *why;
	int fd, k, status;
	pid_t pid;

	pgsz = getpagesize();
	fd = open_dmirror(&why);
	if (fd < 0)
		SKIP(return, "%s", why);
	rs = mmap(NULL, sizeof(*rs), PROT_READ | PROT_WRITE,
		  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	ASSERT_NE(rs, MAP_FAILED);
	memset(rs, 0, sizeof(*rs));
	windows0 = read_long(MUTANT_WINDOWS);

	pid = fork();
	ASSERT_GE(pid, 0);
	if (pid == 0)
		race_child(iters, seconds);

	t = now_s();
	for (k = 0; k < NTHREADS; k++)
		seen[k] = t;
	for (;;) {
		pid_t w = waitpid(pid, &status, WNOHANG);

		if (w == pid)
			break;
		usleep(100 * 1000);
		t = now_s();
		for (k = 0; k < NTHREADS; k++) {
			/* after the stop, only the device thread goes on */
			if (rs->stop && k != T_DEVICE)
				continue;
			if (rs->beat[k] != last[k]) {
				last[k] = rs->beat[k];
				seen[k] = t;
			}
			if (t - seen[k] > hang_s)
				break;
		}
		if (k < NTHREADS)
			break;
	}
	windows = read_long(MUTANT_WINDOWS);
	note("hmm_race_calls=%ld hmm_race_raced=%ld hmm_race_aborts=%ld hmm_race_migrated=%ld hmm_race_einval=%ld hmm_race_errors=%ld",
	     rs->calls, rs->raced, rs->aborts, rs->migrated, rs->einval, rs->errors);
	if (windows >= 0)
		note("hmm_race_split_windows=%ld", windows - windows0);
	if (!rs->done) {
		/*
		 * A thread waits on a migration entry no one will remove: the
		 * child can no longer be killed or reaped.  Say so once.
		 */
		write_text("/proc/sys/kernel/hung_task_timeout_secs", "0", false);
		note("hmm_race_hang=%s", rs->stop ? "final read" : tname[k]);
		ksft_print_msg("no progress for %.0f s in the %s thread (%s): a migration entry left behind\n",
			       hang_s, tname[k], rs->stop ? "final read" : "race");
		ASSERT_TRUE(rs->done);
	}
	ASSERT_TRUE(WIFEXITED(status));
	ASSERT_EQ(WEXITSTATUS(status), 0);
	EXPECT_EQ(rs->errors, 0) TH_LOG("first error: %s", strerror(rs->err));
	EXPECT_EQ(rs->final_bad, 0);
	/* The race must have been run: calls that CPU threads raced. */
	EXPECT_GE(rs->calls, 10);
	EXPECT_GE(rs->raced, rs->calls / 2);
	EXPECT_GT(rs->migrated, 0);
	close(fd);
}

/* kprobe hits of the functions counted, from tracefs kprobe_profile */
static const char *const probes[] = {
	"p:hmmlab/walk walk_page_range",
	"p:hmmlab/walk_vma walk_page_range_vma",
	"p:hmmlab/fault handle_mm_fault",
};
#define NPROBES (sizeof(probes) / sizeof(probes[0]))

static bool probes_on(void)
{
	unsigned int i;

	tracefs_write("events/hmmlab/enable", "0", false);
	if (tracefs_write("kprobe_events", "", false))
		return false;
	for (i = 0; i < NPROBES; i++)
		if (tracefs_write("kprobe_events", probes[i], true))
			return false;
	/* Counted by kprobe_profile; nothing goes to the trace buffer. */
	tracefs_write("tracing_on", "0", false);
	tracefs_write("events/hmmlab/enable", "1", false);
	return true;
}

static void probes_read(long hits[NPROBES])
{
	static const char *const names[NPROBES] = { "walk ", "walk_vma ", "fault " };
	char line[256];
	unsigned int i;
	FILE *f;

	for (i = 0; i < NPROBES; i++)
		hits[i] = -1;
	f = fopen(TRACEFS "/kprobe_profile", "r");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		char *s = line;

		while (*s == ' ')
			s++;
		for (i = 0; i < NPROBES; i++)
			if (!strncmp(s, names[i], strlen(names[i])))
				hits[i] = strtol(s + strlen(names[i]), NULL, 10);
	}
	fclose(f);
}

static void probes_off(void)
{
	tracefs_write("events/hmmlab/enable", "0", false);
	tracefs_write("kprobe_events", "", false);
	tracefs_write("tracing_on", "1", false);
}

TEST(bench)
{
	static const struct {
		const char *name;
		unsigned long flags;
	} modes[] = {
		{ "two_calls", HMM_DMIRROR_MIGRATE_TWO_CALLS },
		{ "setup_fault", HMM_DMIRROR_MIGRATE_SETUP },
		{ "hmm_migrate", HMM_DMIRROR_MIGRATE_HMM },
	};
	static const char *const scenarios[] = { "holes", "cow" };
	unsigned long len = env_ul("LAB_HMM_BENCH_MB", 64) << 20;
	unsigned long m, s, i;
	const char *why;
	int fd;

	pgsz = getpagesize();
	fd = open_dmirror(&why);
	if (fd < 0)
		SKIP(return, "%s", why);
	ASSERT_TRUE(probes_on());

	for (s = 0; s < 2; s++) {
		for (m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
			struct hmm_dmirror_migrate_cmd out;
			long h0[NPROBES], h1[NPROBES];
			int pipefd[2] = { -1, -1 };
			pid_t child = -1;
			double t0, t1;
			char *p;
			int ret;

			p = map_aligned(len);
			ASSERT_NE(p, NULL);
			madvise(p, len, MADV_NOHUGEPAGE);
			if (s == 0) {
				for (i = 0; i < len; i += 2 * pgsz)
					p[i] = 1;
			} else {
				for (i = 0; i < len; i += pgsz)
					p[i] = 1;
				/* A child shares it all; we write half back. */
				ASSERT_EQ(pipe(pipefd), 0);
				child = fork();
				ASSERT_GE(child, 0);
				if (child == 0) {
					char c;

					close(pipefd[1]);
					if (read(pipefd[0], &c, 1) < 0)
						_exit(1);
					_exit(0);
				}
				close(pipefd[0]);
				for (i = 0; i < len; i += 2 * pgsz)
					p[i] = 2;
			}

			probes_read(h0);
			t0 = now_s();
			ret = migrate_fault(fd, p, len, modes[m].flags, &out);
			t1 = now_s();
			probes_read(h1);
			if (child > 0) {
				close(pipefd[1]);
				waitpid(child, NULL, 0);
			}
			ASSERT_EQ(ret, 0);
			EXPECT_EQ(out.cpages, len / pgsz);
			note("hmm_bench_%s_%s_walks=%ld hmm_bench_%s_%s_faults=%ld hmm_bench_%s_%s_ms=%.1f",
			     scenarios[s], modes[m].name,
			     h1[0] - h0[0] + h1[1] - h0[1],
			     scenarios[s], modes[m].name, h1[2] - h0[2],
			     scenarios[s], modes[m].name, (t1 - t0) * 1e3);
			munmap(p, len);
		}
	}
	probes_off();
	close(fd);
}

TEST_HARNESS_MAIN
