/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the lab's programs (vfio_pfnmap_lab.c, hmm_lab.c) share: their
 * measurements go to the console as "# lab: key=value" lines for
 * tools/lab-report, and their knobs come from the environment (/init
 * exports the guest's lab.*=V kernel arguments as LAB_*=V).
 */
#ifndef LAB_COMMON_H
#define LAB_COMMON_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

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

#endif /* LAB_COMMON_H */
