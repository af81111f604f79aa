# SPDX-License-Identifier: GPL-2.0
# Workbench for the huge pfnmap series.  Trees and builds live in the cache
# ($PFNMAP_CACHE, default ~/.cache/pfnmap-series), never in this repository.

SERIES ?= mainline
CONFIG ?= debug
PAGE_SIZE ?= 4k

.PHONY: help run test test-all test-arm64 deps fetch apply kunit kunit-nodebug kunit-arm64 lint bisect selftest \
	mutants measure lab lab-measure send list clean-cache

help:
	@echo "make run        main job: fetch base, apply series/$(SERIES), build and run the KUnit suites, print results"
	@echo "make test       every check CI runs (every series; bisect, mutants and lab for mainline only); ends 'N passed, N failed'"
	@echo "make test-all   every check, bisect builds, mutants and labs of the backports too, and arm64 (longer than CI's budget)"
	@echo "make test-arm64 mainline's KUnit suites and arm64 mutants on an arm64 kernel (qemu-system-aarch64, TCG)"
	@echo "make deps       install the Debian packages the tools use"
	@echo "make fetch      download and commit the base tree of series/$(SERIES)"
	@echo "make apply      apply series/$(SERIES) to its base (git am) in the cache"
	@echo "make kunit      build and run the KUnit suites (CONFIG=debug|nodebug)"
	@echo "make kunit-nodebug the same, CONFIG=nodebug"
	@echo "make kunit-arm64 the same on arm64 (PAGE_SIZE=4k|16k|64k)"
	@echo "make lint       checkpatch --strict and trailer checks on every patch"
	@echo "make bisect     build every patch of series/$(SERIES) on its own"
	@echo "make selftest   the tools' own tests"
	@echo "make mutants    the mutant runs of kunit/mutants"
	@echo "make measure    the numbers the series claims, on a kernel without debug options"
	@echo "make lab        end-to-end VFIO lab in QEMU (vfio-pci, type1, VT-d): base, mutant, patched"
	@echo "make lab-measure the lab on kernels without debug options (the timings of the table)"
	@echo "make send       prepare series/$(SERIES) for b4 as you (git config user.name/email) and render every mail offline; sends nothing"
	@echo "make list       the numbered patches of series/$(SERIES)"
	@echo "Variables: SERIES=$(SERIES) CONFIG=$(CONFIG) PAGE_SIZE=$(PAGE_SIZE); environment: KSRC, PFNMAP_CACHE, JOBS"

run: deps
	tools/kunit --series $(SERIES) --config $(CONFIG)

test:
	tools/check

test-all:
	tools/check --all

test-arm64:
	tools/check --series mainline --only deps --only fetch --only arm64

deps:
	tools/deps

fetch: deps
	tools/fetch-base --series $(SERIES)

apply: fetch
	tools/apply --series $(SERIES)

kunit:
	tools/kunit --series $(SERIES) --config $(CONFIG)

kunit-nodebug:
	tools/kunit --series $(SERIES) --config nodebug

kunit-arm64:
	tools/kunit --series $(SERIES) --config $(CONFIG) --arch arm64 --page-size $(PAGE_SIZE)

lint:
	tools/lint

bisect:
	tools/bisect-build --series $(SERIES)

selftest:
	tools/selftest

mutants:
	tools/check --series $(SERIES) --only mutants --all

measure: deps
	tools/measure --series $(SERIES)

send: deps
	tools/send --series $(SERIES)

lab: deps
	tools/lab --series $(SERIES) --config $(CONFIG)

lab-measure: deps
	tools/lab --series $(SERIES) --config nodebug

list:
	tools/apply --series $(SERIES) --list

clean-cache:
	@echo "The cache is $${PFNMAP_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/pfnmap-series};"
	@echo "remove it by hand if you mean it (it holds the base trees, builds and ccache)."
