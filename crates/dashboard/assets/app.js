'use strict';
// The meshca dashboard. It renders the status document (`meshca status -o json`, served at
// /api/status) and fetches it again every POLL_MS; between fetches it re-renders every second
// on the server's clock (the document's `now` plus the time since it arrived), so countdowns
// and the "now" line move without trusting the browser's clock.
//
// Everything is built as DOM and SVG elements through d3's data joins, keyed by certificate or
// cluster: a refresh updates the elements in place (scroll positions, focus and filters stay),
// and a value from the document can only ever become text, never markup.
(() => {
  const POLL_MS = 2000;
  const ROOT_ROTATION_PHASES = ['Idle', 'Distributing', 'Switching', 'Draining', 'Retiring'];

  // The states of a certificate, most severe first. Each has a colour in app.css
  // (.state-<name>), a row here and a rule in classifyCluster.
  const STATES = [
    { name: 'revoked', label: 'revoked' },
    { name: 'expired', label: 'expired' },
    { name: 'degraded', label: 'degraded' },
    { name: 'renewing', label: 'renewing' },
    { name: 'healthy', label: 'healthy' },
    { name: 'pending', label: 'no intermediate yet' },
  ];
  const STATE_RANK = new Map(STATES.map((s, i) => [s.name, i]));

  const view = {
    doc: null,
    receivedAt: 0, // performance.now() when `doc` arrived
    range: 'intermediates',
    filter: '',
    stateFilter: null,
    policy: null, // with several RootTrustPolicies: the mesh shown (null: the first)
    renders: 0,
  };

  const utc = d3.utcFormat('%Y-%m-%d %H:%M:%SZ');
  const time = (t) => (t > 0 ? utc(new Date(t * 1000)) : '–');

  // The same short form as `meshca status` (status::human).
  function human(secs) {
    const neg = secs < 0;
    const s = Math.abs(Math.trunc(secs));
    let text;
    if (s >= 86400) text = `${Math.floor(s / 86400)}d${Math.floor((s % 86400) / 3600)}h`;
    else if (s >= 3600) text = `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
    else if (s >= 60) text = `${Math.floor(s / 60)}m${s % 60}s`;
    else text = `${s}s`;
    return neg ? `-${text}` : text;
  }
  const ago = (now, t) => (t > 0 ? `${human(now - t)} ago` : '–');
  const left = (now, t) => (t <= 0 ? '–' : t > now ? `${human(t - now)} left` : `expired ${human(now - t)} ago`);
  const short = (s, n) => (s && s.length > n ? `${s.slice(0, n)}…` : s || '');

  function serverNow() {
    if (!view.doc) return 0;
    return view.doc.now + Math.floor((performance.now() - view.receivedAt) / 1000);
  }

  // ---- the model: the document classified -----------------------------------------------

  function classifyCluster(c, now, alerted) {
    if (!c.registered || !c.intermediateSerial) return 'pending';
    // `meshca revoke` makes the cluster re-issue at once, so this lasts until its new
    // intermediate is in place (or for good, if the cluster cannot get one).
    if ((c.issued || []).some((r) => r.serial === c.intermediateSerial && r.revoked)) return 'revoked';
    if (c.intermediateNotAfter > 0 && now >= c.intermediateNotAfter) return 'expired';
    if (c.phase === 'Degraded' || !c.connected || alerted.has(c.name)) return 'degraded';
    if (c.phase === 'Renewing' || (c.nextRenewal > 0 && now >= c.nextRenewal)) return 'renewing';
    return 'healthy';
  }

  function classifyCa(cert, now, warned) {
    if (now >= cert.notAfter) return 'expired';
    return warned ? 'degraded' : 'healthy';
  }

  // With several RootTrustPolicies the document is the overview: every mesh's own status in
  // `meshes` (without clusters) and every cluster naming its `policy`. The page shows one mesh
  // at a time, as a document of its own: its roots, rotation and alerts, and its clusters; the
  // clusters in no mesh (selected by none, or by several) are counted in the header, and the
  // alerts of no mesh in particular (a cluster two policies claim) are shown with every mesh.
  function meshDoc(full) {
    const meshes = full.meshes || [];
    if (meshes.length <= 1) return { ...full, meshNames: [], outside: [] };
    const mesh = meshes.find((m) => m.policy === view.policy) || meshes[0];
    return {
      ...mesh,
      now: full.now,
      clusters: full.clusters.filter((c) => c.policy === mesh.policy),
      alerts: full.alerts.filter((a) => a.policy === mesh.policy || !a.policy),
      meshNames: meshes.map((m) => m.policy),
      outside: full.clusters.filter((c) => !c.policy),
    };
  }

  function model(doc, now) {
    const alerted = new Set(doc.alerts.filter((a) => a.cluster).map((a) => a.cluster));
    const kinds = new Set(doc.alerts.map((a) => a.kind));
    const threshold = doc.rootRotationThreshold || 0;
    const roots = (doc.roots || []).map((r) => ({
      key: `root:${r.fingerprint}`,
      kind: 'root',
      label: r.subject,
      cert: r,
      notBefore: r.notBefore,
      notAfter: r.notAfter,
      // The earliest root past the threshold is the one a root rotation should replace.
      state: classifyCa(r, now, threshold > 0 && now > threshold && r.notAfter === doc.rootNotAfter),
    }));
    const up = doc.upstreamIntermediate;
    const upstream =
      up && up.serial
        ? {
            key: `upstream:${up.fingerprint}`,
            kind: 'upstream',
            label: up.subject,
            cert: up,
            notBefore: up.notBefore,
            notAfter: up.notAfter,
            state: classifyCa(up, now, kinds.has('UpstreamIntermediateExpiring')),
          }
        : null;
    const clusters = doc.clusters
      .map((c) => ({
        key: `cluster:${c.name}`,
        kind: 'cluster',
        label: c.name,
        cluster: c,
        notBefore: c.intermediateCertNotBefore || c.intermediateNotBefore,
        notAfter: c.intermediateSerial ? c.intermediateNotAfter : 0,
        state: classifyCluster(c, now, alerted),
      }))
      .sort((a, b) => a.label.localeCompare(b.label, undefined, { numeric: true }));
    const issuers = new Map();
    for (const r of roots) issuers.set(r.cert.fingerprint, r);
    if (upstream) issuers.set(upstream.cert.fingerprint, upstream);
    return { doc, now, roots, upstream, clusters, issuers, threshold };
  }

  function visible(m) {
    const f = view.filter.trim().toLowerCase();
    return m.clusters.filter(
      (c) => (!f || c.label.toLowerCase().includes(f)) && (!view.stateFilter || c.state === view.stateFilter),
    );
  }

  // ---- small DOM helpers -------------------------------------------------------------------

  // A keyed join of the `tag.cls` children of `parent` (every class in `cls` must match), each
  // built once by `build` when it enters.
  function keyed(parent, tag, cls, data, key, build) {
    return parent
      .selectAll(`:scope > ${tag}.${cls.split(' ').join('.')}`)
      .data(data, key)
      .join((enter) => {
        const e = enter.append(tag).attr('class', cls);
        if (build) e.each(function (d) { build(d3.select(this), d); });
        return e;
      });
  }

  // The rows of a <dl>: [term, value, class of the value]; each pair in a <div>.
  function facts(dl, pairs) {
    keyed(dl, 'div', 'fact', pairs, (p) => p[0], (f) => {
      f.append('dt');
      f.append('dd');
    })
      .call((f) => f.select('dt').text((p) => p[0]))
      .call((f) => f.select('dd').attr('class', (p) => p[2] || null).text((p) => p[1]));
  }

  // ---- header and summary ------------------------------------------------------------------

  function renderHeader(m) {
    const d = m.doc;
    const several = d.meshNames.length > 1;
    const pick = d3.select('#policy-pick').attr('hidden', several ? null : '');
    keyed(pick.select('select'), 'option', 'policy', d.meshNames, (n) => n, (o) => o.attr('value', (n) => n).text((n) => n))
      .property('selected', (n) => n === d.policy);
    facts(d3.select('#mesh-facts'), [
      ['trust domain', d.trustDomain],
      ['CA mode', d.caMode],
      ['root set', short(d.rootSetFingerprint, 23) || '–', 'mono'],
      ['policy generation', short(d.policyGeneration, 12) || '–', 'mono'],
      ...(several ? [['in no mesh', String(d.outside.length), d.outside.length ? 'warn' : null]] : []),
    ]);
  }

  function renderSummary(m) {
    const counts = new Map(STATES.map((s) => [s.name, 0]));
    for (const c of m.clusters) counts.set(c.state, counts.get(c.state) + 1);
    const chips = [{ name: null, label: 'clusters', n: m.clusters.length }].concat(
      STATES.filter((s) => s.name !== 'pending' || counts.get('pending') > 0).map((s) => ({
        name: s.name,
        label: s.label,
        n: counts.get(s.name),
      })),
    );
    keyed(d3.select('#summary'), 'button', 'chip', chips, (c) => c.name || 'all', (b) => {
      b.attr('type', 'button');
      b.append('span').attr('class', 'n');
      b.append('span').attr('class', 'what');
      b.on('click', (_e, c) => {
        view.stateFilter = view.stateFilter === c.name ? null : c.name;
        render();
      });
    })
      .attr('class', (c) => `chip ${c.name ? `state-${c.name}` : 'all'}`)
      .attr('aria-pressed', (c) => String(view.stateFilter === c.name && c.name !== null))
      .attr('data-state', (c) => c.name)
      .call((b) => b.select('.n').text((c) => c.n))
      .call((b) => b.select('.what').text((c) => c.label));
    d3.select('#summary')
      .selectAll(':scope > .alert-count')
      .data([m.doc.alerts.length])
      .join('a')
      .attr('class', (n) => `alert-count ${n ? 'some' : 'none'}`)
      .attr('href', '#alerts-panel')
      .text((n) => (n ? `${n} alert${n > 1 ? 's' : ''}` : 'no alerts'));
  }

  // ---- trust tree --------------------------------------------------------------------------

  function caNode(sel, now) {
    sel
      .attr('class', (d) => `node ca ${d.kind} state-${d.state}`)
      .attr('data-cert', (d) => d.key)
      .attr('data-state', (d) => d.state)
      .each(function (d) {
        const n = d3.select(this);
        const head = n.selectAll(':scope > .node-head').data([d]).join('div').attr('class', 'node-head');
        head.selectAll('.kind').data([d]).join('span').attr('class', 'kind')
          .text(d.kind === 'root' ? 'root' : 'management intermediate');
        head.selectAll('.badge').data([d]).join('span').attr('class', 'badge').text(d.state);
        n.selectAll(':scope > .subject').data([d]).join('div').attr('class', 'subject').text(d.label);
        facts(keyed(n, 'dl', 'facts', [d], () => 'facts'), [
          ['serial', d.cert.serial, 'serial mono'],
          ['key', d.cert.keyAlgorithm || '–'],
          ['not after', time(d.notAfter)],
          ['left', left(now, d.notAfter), 'left'],
          ['fingerprint', short(d.cert.fingerprint, 23), 'mono'],
        ]);
      });
  }

  function clusterCard(sel, m) {
    const now = m.now;
    sel
      .attr('class', (d) => `card state-${d.state}`)
      .attr('data-cluster', (d) => d.label)
      .attr('data-serial', (d) => d.cluster.intermediateSerial)
      .attr('data-state', (d) => d.state)
      .each(function (d) {
        const c = d.cluster;
        const card = d3.select(this);
        const head = card.selectAll(':scope > .card-head').data([d]).join('div').attr('class', 'card-head');
        head.selectAll('.name').data([d]).join('span').attr('class', 'name').text(d.label);
        head.selectAll('.badge').data([d]).join('span').attr('class', 'badge')
          .text(STATES[STATE_RANK.get(d.state)].label);
        const phase = !c.registered ? 'not registered' : !c.enrolled ? 'not enrolled' : c.phase || '–';
        const link = c.connected ? 'connected' : c.lastSeen > 0 ? `last seen ${ago(now, c.lastSeen)}` : 'never seen';
        const where = c.keyLocation === 'memory' ? 'key in memory' : c.keyLocation ? `key in ${c.keyLocation}` : '';
        const renewal = c.nextRenewal > 0 ? (c.nextRenewal > now ? `in ${human(c.nextRenewal - now)}` : 'due') : '–';
        const rows = [
          ['serial', c.intermediateSerial || '–', 'serial mono'],
          ['key', [c.keyAlgorithm || '–', where].filter(Boolean).join(' · ')],
          ['not after', c.intermediateNotAfter > 0 ? `${time(c.intermediateNotAfter)} · ${left(now, c.intermediateNotAfter)}` : '–', 'left'],
          ['renewal', renewal],
          ['phase', `${phase} · ${link}`],
        ];
        if (c.lastError) rows.push(['last error', c.lastError, 'error']);
        facts(keyed(card, 'dl', 'facts', [d], () => 'facts'), rows);
      });
  }

  function renderTree(m) {
    const roots = d3.select('#tree .tier.roots');
    roots.select('.tier-label').text(m.roots.length > 1 ? `root set · ${m.roots.length} roots` : 'root');
    keyed(roots.select('.nodes'), 'div', 'node', m.roots, (d) => d.key).call(caNode, m.now);
    const upstream = d3.select('#tree .tier.upstream').attr('hidden', m.upstream ? null : '');
    keyed(upstream.select('.nodes'), 'div', 'node', m.upstream ? [m.upstream] : [], (d) => d.key).call(caNode, m.now);

    // Cluster intermediates, grouped under the certificate that signed them.
    const shown = visible(m);
    const groups = d3.groups(shown, (c) => c.cluster.issuerFingerprint || '');
    groups.sort((a, b) => (a[0] === '' ? 1 : b[0] === '' ? -1 : a[0].localeCompare(b[0])));
    const tier = d3.select('#tree .tier.clusters');
    tier.select('.tier-label').text(
      `cluster intermediates · ${shown.length === m.clusters.length ? m.clusters.length : `${shown.length} of ${m.clusters.length}`}`,
    );
    keyed(tier.select('.groups'), 'div', 'group', groups, (g) => g[0], (g) => {
      g.append('div').attr('class', 'group-head');
      g.append('div').attr('class', 'cards');
    }).each(function ([fp, members]) {
      const g = d3.select(this);
      const issuer = m.issuers.get(fp);
      g.select('.group-head').text(
        issuer
          ? `signed by ${issuer.kind === 'root' ? 'root' : 'the management intermediate'} ${issuer.label} · ${short(fp, 11)}`
          : 'issuer not recorded by the management plane (signed elsewhere, e.g. by Vault)',
      );
      keyed(g.select('.cards'), 'div', 'card', members, (d) => d.key).call(clusterCard, m);
    });
    keyed(tier, 'p', 'empty muted', shown.length ? [] : [0], () => 'empty').text(
      m.clusters.length ? 'No cluster matches the filter.' : 'No cluster yet: meshca cluster add NAME',
    );
  }

  // ---- expiry timeline ---------------------------------------------------------------------

  const ROW_H = 22;
  const LABEL_W = 190;
  const LEFT_W = 150;
  const AXIS_H = 64;

  function domainFor(rows, m) {
    const now = m.now;
    const inter = rows.filter((r) => r.kind === 'cluster' && r.notAfter > 0);
    const pick = view.range === 'intermediates' && inter.length ? inter : rows.filter((r) => r.notAfter > 0);
    let lo = d3.min(pick, (r) => r.notBefore);
    let hi = d3.max(pick, (r) => Math.max(r.notAfter, r.cluster ? r.cluster.nextRenewal : 0));
    if (lo === undefined) return [now - 3600, now + 3600];
    if (view.range === 'all' && m.threshold > 0) hi = Math.max(hi, m.threshold);
    lo = Math.min(lo, now);
    hi = Math.max(hi, now);
    const pad = Math.max(1, (hi - lo) * 0.04);
    return [lo - pad, hi + pad];
  }

  // Shortens an SVG text to fit `max` pixels (full text in its <title>).
  function fit(text, full, max) {
    const node = text.node();
    if (node.__full === full && node.__max === max) return;
    node.__full = full;
    node.__max = max;
    text.text(full);
    if (node.getComputedTextLength() <= max) return;
    let lo = 0;
    let hi = full.length;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      text.text(`${full.slice(0, mid)}…`);
      if (node.getComputedTextLength() <= max) lo = mid;
      else hi = mid - 1;
    }
    text.text(`${full.slice(0, lo)}…`);
  }

  function renderTimeline(m) {
    const rows = [...m.roots, ...(m.upstream ? [m.upstream] : []), ...visible(m)];
    const width = Math.max(640, document.querySelector('#timeline .tl-body').clientWidth);
    const x0 = LABEL_W;
    const x1 = width - LEFT_W;
    const [lo, hi] = domainFor(rows, m);
    const x = d3.scaleUtc().domain([new Date(lo * 1000), new Date(hi * 1000)]).range([x0, x1]);
    const X = (t) => x(new Date(t * 1000));
    const within = (t) => t >= lo && t <= hi;

    // Axis and the labels of the global markers, in a header that stays put while rows scroll.
    const axis = d3.select('#tl-axis').attr('width', width).attr('height', AXIS_H);
    keyed(axis, 'g', 'axis', [0], () => 'axis')
      .attr('transform', `translate(0,${AXIS_H - 1})`)
      .call(d3.axisTop(x).ticks(Math.max(2, Math.floor((x1 - x0) / 140))).tickSizeOuter(0));
    const markers = [{ key: 'now', t: m.now, label: 'now' }];
    if (m.threshold > 0 && within(m.threshold)) {
      markers.push({ key: 'threshold', t: m.threshold, label: 'root rotation threshold' });
    }
    const labels = keyed(axis, 'text', 'marker-label', markers, (d) => d.key)
      .attr('class', (d) => `marker-label ${d.key}`)
      .text((d) => d.label)
      .attr('text-anchor', 'middle');
    // Two lanes: a label that would overlap the one before it goes one lane down.
    const placed = [];
    labels.each(function (d) {
      const w = this.getComputedTextLength();
      const cx = Math.min(Math.max(X(d.t), x0 + w / 2), x1 - w / 2 + LEFT_W - 4);
      const lane = placed.some((p) => Math.abs(p.cx - cx) < (p.w + w) / 2 + 6) ? 1 : 0;
      placed.push({ cx, w });
      d3.select(this).attr('x', cx).attr('y', 13 + lane * 14);
    });
    keyed(axis, 'line', 'marker', markers, (d) => d.key)
      .attr('class', (d) => `marker ${d.key}`)
      .attr('x1', (d) => X(d.t))
      .attr('x2', (d) => X(d.t))
      .attr('y1', 32)
      .attr('y2', AXIS_H);

    // One row per certificate: label, bar from NotBefore to NotAfter, next renewal, time left.
    const height = rows.length * ROW_H + 4;
    const body = d3.select('#tl-rows').attr('width', width).attr('height', height);
    const row = keyed(body, 'g', 'row', rows, (d) => d.key, (g) => {
      g.append('rect').attr('class', 'stripe');
      g.append('text').attr('class', 'row-label').append('title');
      g.append('text').attr('class', 'row-left');
    })
      .attr('class', (d) => `row ${d.kind} state-${d.state}`)
      .attr('data-row', (d) => d.key)
      .attr('transform', (d, i) => `translate(0,${i * ROW_H})`);
    row.select('.stripe').attr('x', 0).attr('width', width).attr('height', ROW_H);
    row.select('.row-label').attr('x', 8).attr('y', ROW_H / 2 + 4).each(function (d) {
      const t = d3.select(this);
      const full = d.kind === 'cluster' ? d.label : `${d.kind === 'root' ? 'root' : 'mgmt'} · ${d.label}`;
      t.select('title').remove();
      fit(t, full, LABEL_W - 16);
      t.append('title').text(full);
    });
    row.select('.row-left').attr('x', width - 8).attr('y', ROW_H / 2 + 4).attr('text-anchor', 'end')
      .text((d) => (d.notAfter > 0 ? left(m.now, d.notAfter) : 'no intermediate'));

    const bar = (d) => ({ a: Math.max(X(d.notBefore), x0), b: Math.min(X(d.notAfter), x1) });
    row.selectAll('rect.cert-bar').data((d) => (d.notAfter > 0 ? [d] : [])).join((e) =>
      e.append('rect').attr('class', 'cert-bar').call((r) => r.append('title')),
    )
      .attr('data-cert', (d) => d.key)
      .attr('data-serial', (d) => (d.cluster ? d.cluster.intermediateSerial : d.cert.serial))
      .attr('x', (d) => bar(d).a)
      .attr('width', (d) => Math.max(2, bar(d).b - bar(d).a))
      .attr('y', 5)
      .attr('height', ROW_H - 10)
      .attr('rx', 3)
      .call((r) => r.select('title').text((d) => `${d.label}\n${time(d.notBefore)} → ${time(d.notAfter)}`));
    // A bar that runs past either edge ends in an arrow.
    row.selectAll('path.clip').data((d) => {
      if (!(d.notAfter > 0)) return [];
      const out = [];
      if (d.notBefore < lo) out.push({ side: -1 });
      if (d.notAfter > hi) out.push({ side: 1 });
      return out;
    }).join('path')
      .attr('class', 'clip')
      .attr('d', (s) => {
        const at = s.side > 0 ? x1 : x0;
        const y = ROW_H / 2;
        return `M${at} ${y - 6} l${s.side * 7} 6 l${-s.side * 7} 6 z`;
      });
    row.selectAll('path.renewal-mark').data((d) => (d.cluster && d.cluster.nextRenewal > 0 && within(d.cluster.nextRenewal) ? [d] : []))
      .join((e) => e.append('path').attr('class', 'renewal-mark').call((p) => p.append('title')))
      .attr('d', (d) => `M${X(d.cluster.nextRenewal)} ${ROW_H / 2 - 6} l5 6 l-5 6 l-5 -6 z`)
      .call((p) => p.select('title').text((d) => `next renewal ${time(d.cluster.nextRenewal)}`));

    keyed(body, 'line', 'marker', markers, (d) => d.key)
      .attr('class', (d) => `marker ${d.key}`)
      .attr('x1', (d) => X(d.t))
      .attr('x2', (d) => X(d.t))
      .attr('y1', 0)
      .attr('y2', height);

    // What the range leaves out.
    const notes = [];
    if (m.threshold > 0 && !within(m.threshold)) {
      notes.push(`root rotation threshold ${time(m.threshold)} (${m.threshold > m.now ? `in ${human(m.threshold - m.now)}` : `${human(m.now - m.threshold)} ago`}) is outside this range`);
    }
    renderLegend(notes);
  }

  function renderLegend(notes) {
    const legend = d3.select('#timeline-legend');
    const items = STATES.filter((s) => s.name !== 'pending')
      .map((s) => ({ key: s.name, cls: `swatch state-${s.name}`, text: s.label }))
      .concat([
        { key: 'now', cls: 'swatch-line now', text: 'now' },
        { key: 'renewal', cls: 'swatch-diamond', text: 'next renewal' },
        { key: 'threshold', cls: 'swatch-line threshold', text: 'root rotation threshold' },
      ]);
    keyed(legend, 'span', 'item', items, (d) => d.key, (s, d) => {
      s.append('span').attr('class', d.cls);
      s.append('span').text(d.text);
    });
    keyed(legend, 'span', 'note', notes, (d) => d).text((d) => d);
  }

  // ---- rotations, alerts, history ----------------------------------------------------------

  // The root rotation as `meshca status -o json` reports it (`rootRotation`): `Idle` with at
  // most a note when none is in progress; otherwise its phase among the four steps, the two
  // roots, what it waits for (clusters by name, or a time), how many clusters have converged,
  // and every phase change so far.
  function renderRootRotation(m) {
    const rr = m.doc.rootRotation || { phase: 'Idle' };
    const active = rr.phase !== 'Idle';
    const box = d3.select('#root-rotation');
    keyed(box, 'h3', 'sub', [0], () => 'h').text('Root rotation');
    keyed(box, 'p', 'muted', active ? [] : [0], () => 'none').text(
      rr.note ? `No root rotation in progress. ${rr.note}` : 'No root rotation in progress.',
    );
    keyed(box, 'ol', 'phases', active ? [0] : [], () => 'phases')
      .selectAll('li')
      .data(active ? ROOT_ROTATION_PHASES.slice(1) : [], (p) => p)
      .join('li')
      .attr('class', (p) => {
        const at = ROOT_ROTATION_PHASES.indexOf(rr.phase);
        const i = ROOT_ROTATION_PHASES.indexOf(p);
        return i === at ? 'current' : i < at ? 'done' : 'todo';
      })
      .text((p) => p);
    facts(keyed(box, 'dl', 'kv', active ? [0] : [], () => 'kv'), active ? rotationFacts(rr, m) : []);
  }

  function rotationFacts(rr, m) {
    const when = (t) => (t ? `${time(t)} (${t > m.now ? `in ${human(t - m.now)}` : `${human(m.now - t)} ago`})` : '–');
    const root = (c) => (c ? `${c.subject} · serial ${short(c.serial, 16)} · until ${time(c.notAfter)}` : '–');
    const waits = (rr.waitingFor || []).map((w) => (w.cluster ? `${w.cluster}: ${w.reason}` : w.reason));
    const pairs = [
      ['rotation', `${rr.id || '–'}, started by ${rr.trigger || '–'}${rr.aborted ? '; aborted: every cluster returns to the old root' : ''}`],
      ['started', when(rr.startedAt)],
      ['in this phase since', when(rr.phaseSince)],
      ['old root', root(rr.from)],
      ['new root', root(rr.to)],
      ['waiting for', waits.length ? waits.join('; ') : 'nothing'],
      ['next step', rr.nextStepAt ? `not before ${when(rr.nextStepAt)}` : 'once every covered cluster has converged'],
      ['converged', `${(rr.converged || []).length} of ${m.doc.clusters.length} clusters`],
    ];
    if (rr.note) pairs.push(['note', rr.note]);
    const steps = (rr.transitions || []).map((t) => `${t.phase} at ${time(t.at)}${t.note ? ` (${t.note})` : ''}`);
    if (steps.length) pairs.push(['phase changes', steps.join(' → ')]);
    return pairs;
  }

  function table(container, cls, columns, rows, key) {
    const t = keyed(container, 'table', cls, rows.length ? [0] : [], () => cls, (tb) => {
      tb.append('thead').append('tr').selectAll('th').data(columns).join('th').text((c) => c);
      tb.append('tbody');
    });
    return keyed(t.select('tbody'), 'tr', 'r', rows, key).each(function (r) {
      d3.select(this).selectAll('td').data(r.cells).join('td').attr('class', (c) => c.cls || null).text((c) => c.text);
    });
  }

  function renderRotations(m) {
    const box = d3.select('#rotations');
    keyed(box, 'h3', 'sub', [0], () => 'h').text('Cluster intermediates');
    const rotating = m.clusters.filter((c) => c.state === 'renewing');
    const soonest = m.clusters
      .filter((c) => c.cluster.nextRenewal > m.now)
      .sort((a, b) => a.cluster.nextRenewal - b.cluster.nextRenewal)[0];
    keyed(box, 'p', 'muted', rotating.length ? [] : [0], () => 'none').text(
      soonest
        ? `None in progress; next: ${soonest.label} in ${human(soonest.cluster.nextRenewal - m.now)}.`
        : 'None in progress.',
    );
    table(box, 'rotating', ['cluster', 'phase', 'since last renewal', 'serial in service'], rotating.map((c) => ({
      key: c.key,
      cells: [
        { text: c.label },
        { text: c.cluster.phase || '–' },
        { text: ago(m.now, c.cluster.lastRenewal) },
        { text: short(c.cluster.intermediateSerial, 16), cls: 'mono' },
      ],
    })), (r) => r.key);
  }

  function renderAlerts(m) {
    const box = d3.select('#alerts');
    const rows = m.doc.alerts.map((a, i) => ({
      key: `${a.kind}/${a.cluster}/${i}`,
      cells: [{ text: a.kind, cls: 'kind' }, { text: a.cluster || '–' }, { text: a.message }],
    }));
    if (m.doc.policyError) rows.unshift({ key: 'policy', cells: [{ text: 'policy', cls: 'kind' }, { text: '–' }, { text: m.doc.policyError }] });
    keyed(box, 'p', 'muted', rows.length ? [] : [0], () => 'none').text('No alerts: nothing needs a person.');
    table(box, 'alerts', ['kind', 'cluster', 'message'], rows, (r) => r.key);
  }

  function renderHistory(m) {
    const all = [];
    for (const c of m.doc.clusters) for (const r of c.issued || []) all.push({ cluster: c.name, r });
    all.sort((a, b) => b.r.issuedAt - a.r.issuedAt);
    const rows = all.slice(0, 25).map(({ cluster, r }) => ({
      key: `${cluster}/${r.serial}`,
      cells: [
        { text: `${time(r.issuedAt)} (${ago(m.now, r.issuedAt)})` },
        { text: cluster },
        { text: r.reason },
        { text: r.revoked ? `${short(r.serial, 20)} (revoked: ${r.revoked.reason})` : short(r.serial, 20), cls: r.revoked ? 'mono revoked' : 'mono' },
        { text: r.keyAlgorithm || '–' },
        { text: time(r.notAfter) },
      ],
    }));
    const box = d3.select('#history');
    keyed(box, 'p', 'muted', rows.length ? [] : [0], () => 'none').text('Nothing issued yet.');
    table(box, 'history', ['issued', 'cluster', 'reason', 'serial', 'key', 'not after'], rows, (r) => r.key);
  }

  // ---- the loop ----------------------------------------------------------------------------

  function setLive(state, text) {
    d3.select('#live').attr('data-state', state);
    d3.select('#live-text').text(text);
  }

  function render() {
    if (!view.doc) return;
    const m = model(meshDoc(view.doc), serverNow());
    renderHeader(m);
    renderSummary(m);
    renderTree(m);
    renderTimeline(m);
    renderRootRotation(m);
    renderRotations(m);
    renderAlerts(m);
    renderHistory(m);
    view.renders += 1;
    document.body.dataset.renders = String(view.renders);
    const age = Math.floor((performance.now() - view.receivedAt) / 1000);
    if (d3.select('#live').attr('data-state') === 'live') setLive('live', `live · updated ${age}s ago`);
  }

  async function poll() {
    try {
      const r = await fetch('/api/status', { cache: 'no-store', credentials: 'same-origin' });
      if (r.status === 401) {
        // The session ended: the page itself now shows the login form.
        location.reload();
        return;
      }
      const body = await r.json();
      if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
      view.doc = body;
      view.receivedAt = performance.now();
      setLive('live', 'live');
      render();
    } catch (e) {
      setLive('error', `not updating: ${e.message}; retrying`);
    }
    setTimeout(poll, POLL_MS);
  }

  function init() {
    d3.select('#policy').on('change', function () {
      view.policy = this.value;
      render();
    });
    d3.select('#filter').on('input', function () {
      view.filter = this.value;
      render();
    });
    d3.selectAll('[data-range]').on('click', function () {
      view.range = this.dataset.range;
      d3.selectAll('[data-range]').attr('aria-pressed', function () { return String(this.dataset.range === view.range); });
      render();
    });
    window.addEventListener('resize', render);
    setInterval(render, 1000);
    poll();
  }

  init();
})();
