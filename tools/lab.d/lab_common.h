/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the lab's programs (vfio_pfnmap_lab.c, hmm_lab.c) share: their
 * measurements go to the console as "# lab: key=value" lines for
 * tools/lab-report, their knobs come from the environment (/init
 * exports the guest's lab.*=V kernel arguments as LAB_*=V), and they
 * count in the kernel with tracefs kprobe events.
 */
#ifndef LAB_COMMON_H
#define LAB_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>

#define TRACEFS		"/sys/kernel/tracing"

static inline void note(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("# lab: ");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	fflush(stdout);
}

static inline unsigned long env_ul(const char *name, unsigned long def)
{
	const char *s = getenv(name);

	return s && *s ? strtoul(s, NULL, 0) : def;
}

/* Write @text to @path (appended, or replacing); 0 or -errno. */
static inline int write_text(const char *path, const char *text, bool append)
{
	int fd, ret = 0;

	fd = open(path, O_WRONLY | (append ? O_APPEND : O_TRUNC));
	if (fd < 0)
		return -errno;
	if (write(fd, text, strlen(text)) < 0)
		ret = -errno;
	close(fd);
	return ret;
}

/* The same for a file below tracefs, mounted first if it is not. */
static inline int tracefs_write(const char *file, const char *text, bool append)
{
	char path[256];

	if (access(TRACEFS "/kprobe_events", W_OK))
		mount("tracefs", TRACEFS, "tracefs", 0, NULL);
	snprintf(path, sizeof(path), TRACEFS "/%s", file);
	return write_text(path, text, append);
}

#endif /* LAB_COMMON_H */
