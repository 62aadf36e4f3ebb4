/*
 * ptwalk: a kernel module for the reference kernel that prints the page size
 * of every 2M step of the direct map (and of the kernel image mapping) as
 * lookup_address sees it, to compare with the model (dmfrag.realkernel
 * workload "ptwalk"). Build against Debian's headers:
 *   apt-get install linux-headers-6.1.0-56-amd64
 *   echo "obj-m := ptwalk.o" > Makefile
 *   make -C /lib/modules/6.1.0-56-amd64/build M=$PWD modules
 * then DMFRAG_PTWALK_KO=$PWD/ptwalk.ko. Its own pages are printed (@@PTMOD):
 * loading it splits the 2M region they sit in.
 */
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>
#include <asm/pgtable.h>
#include <asm/page.h>

static unsigned long end_pa = 0x240000000UL;
module_param(end_pa, ulong, 0);
static unsigned long brk_end_addr = 0;
module_param(brk_end_addr, ulong, 0);

static int __init ptwalk_init(void)
{
	unsigned long pa, run_start = 0, end = end_pa;
	int run_level = -1;
	unsigned long a;
	const char *names[] = {"none", "4k", "2M", "1G"};
	for (pa = 0; pa < end; pa += PMD_SIZE) {
		unsigned int level = 0;
		pte_t *pte = lookup_address((unsigned long)__va(pa), &level);
		int lv = (pte && pte_val(*pte)) ? (int)level : 0;
		if (lv == 1) {
			/* a 4K-split 2M region: report as 4k */
		}
		if (lv != run_level) {
			if (run_level >= 0)
				pr_info("@@PT %#lx-%#lx %s\n", run_start, pa - 1, names[run_level]);
			run_start = pa;
			run_level = lv;
		}
	}
	pr_info("@@PT %#lx-%#lx %s\n", run_start, end - 1, names[run_level]);
	run_level = -1;
	for (a = 0xffffffff80000000UL; a < 0xffffffffc0000000UL; a += PMD_SIZE) {
		unsigned int level = 0;
		pte_t *pte = lookup_address(a, &level);
		int lv = (pte && pte_val(*pte)) ? (int)level : 0;
		if (lv != run_level) {
			if (run_level >= 0)
				pr_info("@@HM %#lx-%#lx %s\n", run_start, a - 1, names[run_level]);
			run_start = a;
			run_level = lv;
		}
	}
	pr_info("@@HM %#lx-%#lx %s\n", run_start, 0xffffffffbfffffffUL, names[run_level]);
	if (brk_end_addr)
		pr_info("@@BRK_END %#lx\n", *(unsigned long *)brk_end_addr);
	for (a = (unsigned long)THIS_MODULE->core_layout.base;
	     a < (unsigned long)THIS_MODULE->core_layout.base + THIS_MODULE->core_layout.size; a += PAGE_SIZE)
		pr_info("@@PTMOD %#llx\n", (unsigned long long)page_to_pfn(vmalloc_to_page((void *)a)) << PAGE_SHIFT);
	return 0;
}
module_init(ptwalk_init);
MODULE_LICENSE("GPL");
