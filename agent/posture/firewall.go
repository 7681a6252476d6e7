package posture

import (
	"errors"
	"io/fs"
	"log/slog"
	"path"
	"slices"
	"strconv"
	"strings"
)

// firewallActive reports positive evidence, readable without privileges,
// that the kernel holds packet-filter rules. Listing the rules themselves
// needs CAP_NET_ADMIN (nfnetlink and the iptables sockopts refuse everyone
// else), so the heuristic reads the reference counts the kernel keeps on the
// netfilter modules that rules pin:
//
//   - nftables (nft, firewalld, ufw, iptables-nft): every nftables chain
//     hook and rule expression takes a reference on the nf_tables module.
//     sys/module/nf_tables/refcnt greater than the number of modules in
//     sys/module/nf_tables/holders (each dependent module holds one) means
//     a ruleset is loaded.
//   - iptables-legacy: proc/net/ip_tables_names or ip6_tables_names lists
//     the "filter" table and at least one x_tables extension module
//     (sys/module/xt_*, ipt_*, ip6t_*) is referenced, which happens only
//     while a rule uses it (conntrack state, port matches, REJECT, LOG ...).
//
// Anything else is reported as inactive: netfilter built into the kernel
// (no module reference counts to read), legacy rules that use no extension
// module, or no rules at all. The first two are false negatives by design;
// the heuristic never reports a firewall it has no evidence for. Note that
// it cannot tell an accepting ruleset from a restrictive one.
func firewallActive(root fs.FS, log *slog.Logger) bool {
	nft, nftWhy := nftablesInUse(root)
	if nft {
		return true
	}
	ipt, iptWhy := iptablesInUse(root)
	if ipt {
		return true
	}
	log.Debug("posture: no firewall rule evidence", "nftables", nftWhy, "iptables", iptWhy)
	return false
}

// nftablesInUse reports whether the nf_tables module is referenced beyond
// its dependent modules, and if not, why.
func nftablesInUse(root fs.FS) (bool, string) {
	refs, holders, err := moduleUse(root, "nf_tables")
	if err != nil {
		return false, err.Error()
	}
	if refs > holders {
		return true, ""
	}
	return false, "nf_tables has " + strconv.Itoa(refs) + " references and " + strconv.Itoa(holders) + " dependent modules"
}

// iptablesInUse reports whether a legacy filter table is registered and an
// x_tables extension is referenced by a rule, and if not, why.
func iptablesInUse(root fs.FS) (bool, string) {
	filter := false
	for _, name := range []string{"proc/net/ip_tables_names", "proc/net/ip6_tables_names"} {
		b, err := readBounded(root, name, maxSmallFile)
		if err != nil {
			continue
		}
		if slices.Contains(strings.Fields(string(b)), "filter") {
			filter = true
			break
		}
	}
	if !filter {
		return false, "no legacy filter table registered"
	}
	entries, err := fs.ReadDir(root, "sys/module")
	if err != nil {
		return false, "cannot list kernel modules: " + err.Error()
	}
	for _, e := range entries {
		n := e.Name()
		if !strings.HasPrefix(n, "xt_") && !strings.HasPrefix(n, "ipt_") && !strings.HasPrefix(n, "ip6t_") {
			continue
		}
		if refs, holders, err := moduleUse(root, n); err == nil && refs > holders {
			return true, ""
		}
	}
	return false, "legacy filter table registered but no x_tables extension is in use"
}

// moduleUse returns a loadable module's reference count and the number of
// modules that depend on it.
func moduleUse(root fs.FS, module string) (refs, holders int, err error) {
	if !validDevName(module) {
		return 0, 0, errors.New("invalid module name " + strconv.Quote(module))
	}
	dir := path.Join("sys/module", module)
	b, err := readBounded(root, path.Join(dir, "refcnt"), maxSmallFile)
	if err != nil {
		return 0, 0, errors.New(module + " is not a loaded module (built in or absent): " + err.Error())
	}
	refs, err = strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || refs < 0 {
		return 0, 0, errors.New(module + " has an unreadable reference count")
	}
	entries, err := fs.ReadDir(root, path.Join(dir, "holders"))
	if err != nil {
		return 0, 0, errors.New("cannot list holders of " + module + ": " + err.Error())
	}
	return refs, len(entries), nil
}
