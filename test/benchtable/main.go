// Command benchtable reads `go test -bench` output on stdin and prints
// DESIGN.md's performance table as measured: one row per figure with the
// measured value, the baseline measured in the same run (if any), their
// ratio, the goal and whether it is met. It judges nothing beyond that and
// never fails on a missed goal; it exits 1 only when the input shows a
// failed test or benchmark (after printing the table and the failure lines
// to stderr), so `make bench` still fails when a benchmark breaks.
//
//	go test -run '^$' -bench . ./... | benchtable
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
)

// goal is a DESIGN.md target: measured (or the ratio, when ofBaseline) must
// be at least (or, with below, less than) value.
type goal struct {
	below      bool
	value      float64
	ofBaseline bool
	unit       string // printed after value
}

func (g goal) String() string {
	num := func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	switch {
	case g.value == 0:
		return "—"
	case g.ofBaseline:
		return fmt.Sprintf("≥ %s× baseline", num(g.value))
	case g.below:
		return "< " + num(g.value) + " " + g.unit
	default:
		return "≥ " + num(g.value) + " " + g.unit
	}
}

// figure is one row: which benchmark and metrics it reads and its goal.
type figure struct {
	name     string
	bench    string // benchmark name without the -GOMAXPROCS suffix
	metric   string // unit of the measured value
	baseline string // unit of the baseline value in the same line; "" if none
	ratio    string // unit of a ratio the benchmark reports itself; "" means measured/baseline
	goal     goal
	// goalText is DESIGN.md's goal for a figure with no benchmark yet.
	goalText string
}

// figures follows DESIGN.md's "Performance" table, in its order; a figure
// with no bench has no benchmark yet and is listed so the gap shows.
var figures = []figure{
	{name: "bulk TCP agent→gateway→target, up (raw TCP, spliced)", bench: "BenchmarkBulkTCP/up",
		metric: "pinhole-MiB/s", baseline: "bare-MiB/s", ratio: "ratio", goal: goal{value: 0.9, ofBaseline: true}},
	{name: "bulk TCP agent→gateway→target, down (raw TCP, spliced)", bench: "BenchmarkBulkTCP/down",
		metric: "pinhole-MiB/s", baseline: "bare-MiB/s", ratio: "ratio", goal: goal{value: 0.9, ofBaseline: true}},
	{name: "bulk TCP through the tunnel, recording on, vs OpenSSH -L via a bastion", goalText: "≥ 1.0× ssh -L"},
	{name: "SSH cat throughput through the recording proxy vs ProxyJump", goalText: "≥ 1.0× ProxyJump"},
	{name: "keystroke echo added latency through the proxy, p99", goalText: "< 1 ms over direct"},
	{name: "final approval → first byte through tunnel", goalText: "p50 < 300 ms, p99 < 1 s"},
	{name: "revoke → all flows closed, p50", bench: "BenchmarkRevokeFlowsClosed", metric: "p50-ms"},
	{name: "revoke → all flows closed, p99", bench: "BenchmarkRevokeFlowsClosed", metric: "p99-ms", goal: goal{below: true, value: 500, unit: "ms"}},
	{name: "active grants on one broker, RSS growth each", goalText: "1,000 at < 50 KiB each"},
	{name: "memory per live recorded SSH session", goalText: "≤ 2 MiB"},
	{name: "recorded session starts (SSH, PostgreSQL)", goalText: "≥ 500/s, ≥ 200/s"},
	{name: "posture ingest (nonce + verify + store)", bench: "BenchmarkPostureIngest", metric: "reports/s", goal: goal{value: 2000, unit: "reports/s"}},
	{name: "posture verify only (no store)", bench: "BenchmarkVerify", metric: "ns/op"},
	{name: "audit append (hash chain, durable), 1 caller", bench: "BenchmarkAuditAppend/serial", metric: "events/s", goal: goal{value: 20000, unit: "events/s"}},
	{name: "audit append (hash chain, durable), GOMAXPROCS callers", bench: "BenchmarkAuditAppend/parallel", metric: "events/s", goal: goal{value: 20000, unit: "events/s"}},
	{name: "audit append, 64 per transaction (not a broker path)", bench: "BenchmarkAuditAppend/batch64", metric: "events/s"},
}

// benchLine matches "BenchmarkName-8   1234   56.7 ns/op   8.9 unit ...".
var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+\d+\s+(.*)$`)

// results maps benchmark name to unit to every value seen (one per -count).
type results map[string]map[string][]float64

// parse reads benchmark output and returns the results and the lines that
// report a failure.
func parse(r io.Reader) (results, []string, error) {
	res := results{}
	var failures []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "--- FAIL") || strings.HasPrefix(line, "FAIL") || strings.HasPrefix(line, "panic:") {
			failures = append(failures, line)
			continue
		}
		m := benchLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		fields := strings.Fields(m[2])
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				break
			}
			if res[m[1]] == nil {
				res[m[1]] = map[string][]float64{}
			}
			res[m[1]][fields[i+1]] = append(res[m[1]][fields[i+1]], v)
		}
	}
	return res, failures, sc.Err()
}

// value returns the median of the values of bench's unit.
func (r results) value(bench, unit string) (float64, bool) {
	vs := slices.Clone(r[bench][unit])
	if len(vs) == 0 {
		return 0, false
	}
	slices.Sort(vs)
	return vs[len(vs)/2], true
}

// row is one printed line.
type row struct {
	figure, measured, baseline, ratio, goal, met string
}

func evaluate(res results) []row {
	var rows []row
	for _, f := range figures {
		r := row{figure: f.name, baseline: "—", ratio: "—", goal: f.goal.String(), met: "—"}
		if f.bench == "" {
			r.measured, r.goal = "no benchmark yet", f.goalText
			rows = append(rows, r)
			continue
		}
		m, ok := res.value(f.bench, f.metric)
		if !ok {
			r.measured = "not measured"
			if f.goal.value != 0 {
				r.met = "no"
			}
			rows = append(rows, r)
			continue
		}
		r.measured = num(m) + " " + f.metric
		var ratio float64
		haveRatio := false
		if f.baseline != "" {
			if base, ok := res.value(f.bench, f.baseline); ok {
				r.baseline = num(base) + " " + f.baseline
				if f.ratio != "" {
					ratio, haveRatio = res.value(f.bench, f.ratio)
				} else if base != 0 {
					ratio, haveRatio = m/base, true
				}
			}
		}
		if haveRatio {
			r.ratio = num(ratio) + "×"
		}
		switch g := f.goal; {
		case g.value == 0:
		case g.ofBaseline && !haveRatio:
			r.met = "no"
		case g.ofBaseline:
			r.met = yesNo(ratio >= g.value)
		case g.below:
			r.met = yesNo(m < g.value)
		default:
			r.met = yesNo(m >= g.value)
		}
		rows = append(rows, r)
	}
	return rows
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// num prints v with three significant digits, without exponents.
func num(v float64) string {
	switch a := max(v, -v); {
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}

func printTable(w io.Writer, rows []row) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tmeasured\tbaseline (same run)\tratio\tDESIGN.md goal\tmet")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.figure, r.measured, r.baseline, r.ratio, r.goal, r.met)
	}
	return tw.Flush()
}

func main() {
	res, failures, err := parse(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchtable: reading input:", err)
		os.Exit(2)
	}
	if err := printTable(os.Stdout, evaluate(res)); err != nil {
		fmt.Fprintln(os.Stderr, "benchtable:", err)
		os.Exit(2)
	}
	if len(failures) > 0 {
		fmt.Fprintln(os.Stderr, "benchtable: the run reported failures:")
		for _, l := range failures {
			fmt.Fprintln(os.Stderr, "  "+l)
		}
		os.Exit(1)
	}
}
