// The RE-AIM dashboard: reads this service's JSON and draws it with plain SVG, no library.
// Data only ever reaches the page through textContent and attributes, never as HTML.
// Every read needs an API token (CONTRACT.md 1.2): the page asks for one, or takes it from
// its URL fragment (#token=...), keeps it in this tab's sessionStorage only, sends it as
// Authorization: Bearer, and shows what it may read: a hospital's token, that hospital and
// its departments; a region token, the region and every hospital.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const NO_DATA = "no data";
  const RATIO_GOAL = 10;
  const DAY_MS = 86400000;
  const ISO_DATE = /^\d{4}-\d{2}-\d{2}$/;
  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
    "Nov", "Dec"];
  const MONTH_NAMES = ["January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December"];
  const SOURCE_WORDS = {
    self: "The physician asked",
    third_party: "A colleague asked",
    safety_event: "A safety event report",
  };
  const DECLINE_WORDS = {
    no_time: "No time",
    no_need: "Did not need it",
    privacy: "Privacy",
    discomfort: "Felt uncomfortable",
    medicolegal: "Legal worries",
    other: "Another reason",
    unspecified: "No reason given",
  };

  const TOKEN_KEY = "post-dashboard-token";

  // The table of hospitals (GET reaim-hospitals): the figures it may rank by come from the
  // service (its answer's `figures`); these are only their plain names.
  const RANK_PAGE = 50;
  const DEFAULT_FIGURE = "reach.reach_rate";
  const FIGURE_WORDS = {
    "reach.referrals": "Referrals",
    "reach.interactions": "Support conversations",
    "reach.physicians_supported": "Physicians supported",
    "reach.eligible_physicians": "Eligible physicians",
    "reach.reach_rate": "Physicians reached",
    "reach.minutes_median": "Typical conversation (minutes)",
    "effectiveness.helpful_rate": "Found it helpful",
    "effectiveness.wellbeing_improved_rate": "Felt better",
    "effectiveness.escalation_rate": "Helped on to further care",
    "adoption.departments_launched": "Departments launched",
    "adoption.physician_coverage": "Physicians covered",
    "adoption.outreach_acceptance_rate": "Accepted the offer",
    "adoption.would_recommend_rate": "Would recommend it",
    "implementation.outreach_within_48h_rate": "Contacted within 48 hours",
    "implementation.hours_to_outreach_median": "Typical time to first contact (hours)",
    "implementation.physicians_per_active_supporter": "Physicians per supporter",
    "implementation.referrals_without_supporter": "Referrals with no supporter",
    "maintenance.supporters_active": "Active supporters",
    "maintenance.supporter_retention_rate": "Supporters still active",
    "maintenance.departments_active_rate": "Departments still running it",
  };

  let hospitals = [];
  let known = new Set(); // the hospital ids the picker accepts
  const ranking = { figure: DEFAULT_FIGURE, order: "desc", offset: 0, figures: [], period: "" };
  let rankLoads = 0;
  let lastAnswer = null;
  let loads = 0;
  let token = "";
  let holder = null; // {kind: "hospital" | "region", name}, from GET whoami

  // A refusal of the token itself (401): the page asks for another one.
  class TokenRefused extends Error {}

  // --- small helpers ----------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  const missing = (value) => value === null || value === undefined;

  function percent(rate) {
    if (missing(rate)) return NO_DATA;
    const shown = Math.round(rate * 1000) / 10;
    return shown.toLocaleString("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 }) + "%";
  }

  function number(value, unit) {
    if (missing(value)) return NO_DATA;
    const text = value.toLocaleString("en-US", { maximumFractionDigits: 1 });
    return unit ? text + " " + unit : text;
  }

  function parseDay(iso) {
    const [y, m, d] = iso.split("-").map(Number);
    return new Date(Date.UTC(y, m - 1, d));
  }

  function isoDay(date) {
    return date.toISOString().slice(0, 10);
  }

  function shiftDay(iso, days) {
    return isoDay(new Date(parseDay(iso).getTime() + days * DAY_MS));
  }

  function dayWords(iso) {
    const d = parseDay(iso);
    return d.getUTCDate() + " " + MONTH_NAMES[d.getUTCMonth()] + " " + d.getUTCFullYear();
  }

  function monthWords(month) {
    const [y, m] = month.split("-").map(Number);
    return MONTH_NAMES[m - 1] + " " + y;
  }

  function validDay(value) {
    return value && ISO_DATE.test(value) && !isNaN(parseDay(value)) ? value : "";
  }

  function plural(n, one, many) {
    return n === 1 ? one : many;
  }

  // --- the view in the address bar --------------------------------------------------------

  function readView() {
    const query = new URLSearchParams(location.search);
    const view = {
      hospital: query.get("hospital") || "",
      department: query.get("department") || "",
      from: validDay(query.get("from")),
      to: validDay(query.get("to")),
    };
    if (!view.hospital) view.department = "";
    return view;
  }

  function viewQuery(view, keys) {
    const query = new URLSearchParams();
    for (const key of keys) if (view[key]) query.set(key, view[key]);
    const text = query.toString();
    return text ? "?" + text : "";
  }

  function apiPath(view) {
    let path = "reaim";
    if (view.hospital) {
      path += "/" + encodeURIComponent(view.hospital);
      if (view.department) path += "/" + encodeURIComponent(view.department);
    }
    return path + viewQuery(view, ["from", "to"]);
  }

  // --- pickers ----------------------------------------------------------------------------

  // The choice is also written as the `selected` attribute, so a saved page shows it too.
  function choose(select, value) {
    for (const option of select.options) option.defaultSelected = option.value === value;
    select.value = value;
  }

  // The hospital picker: a text field with every hospital id as a suggestion (a datalist:
  // the browser filters it as one types), empty for the whole region. The value attribute is
  // written too, so a saved page shows the choice.
  function fillHospitals(view) {
    const input = document.getElementById("pick-hospital");
    const list = document.getElementById("hospital-list");
    const region = !holder || holder.kind === "region";
    const ids = hospitals.map((h) => h.hospital);
    if (view.hospital && !ids.includes(view.hospital)) ids.push(view.hospital);
    const fresh = ids.length !== known.size || ids.some((id) => !known.has(id));
    if (fresh) {
      list.replaceChildren(...ids.map((id) => el("option", { value: id })));
      known = new Set(ids);
    }
    input.defaultValue = input.value = view.hospital;
    input.placeholder = region ? "Whole region (type an id)" : "";
    input.disabled = !region; // a hospital's token reads its own hospital only
    hint("", false);
    fillDepartments(view);
  }

  function hint(text, warn) {
    const node = document.getElementById("pick-hint");
    node.textContent = text;
    node.classList.toggle("warn", Boolean(warn));
  }

  // What was typed, as a hospital: "" (the region), a known id, or null (unknown: explained).
  function pickedHospital() {
    const typed = document.getElementById("pick-hospital").value.trim();
    if (!typed || known.has(typed)) return typed;
    const matches = [...known].filter((id) => id.includes(typed)).length;
    hint(matches
      ? "No hospital is called “" + typed + "”: " + matches + " " + plural(matches, "id contains", "ids contain") +
        " it; choose one from the list."
      : "No hospital is called “" + typed + "” and no id contains it. The page still shows the view before.", true);
    return null;
  }

  // While typing: how many ids hold the text (the list then offers them).
  function typing() {
    const typed = document.getElementById("pick-hospital").value.trim();
    if (!typed) {
      hint("Empty: the whole region.", false);
      return;
    }
    const matches = [...known].filter((id) => id.includes(typed)).length;
    hint(known.has(typed) ? "Press Enter to open " + typed + "."
      : matches ? matches + " " + plural(matches, "hospital matches", "hospitals match") + ": choose one from the list."
        : "No hospital id contains “" + typed + "”.", !matches && !known.has(typed));
  }

  function fillDepartments(view) {
    const select = document.getElementById("pick-department");
    select.replaceChildren(el("option", { value: "" }, "All departments"));
    const entry = hospitals.find((h) => h.hospital === view.hospital);
    const launched = entry ? entry.departments.filter((d) => d.launched_on) : [];
    for (const d of launched) {
      const words = d.closed_on ? d.department + " (closed " + dayWords(d.closed_on) + ")" : d.department;
      select.append(el("option", { value: d.department }, words));
    }
    if (view.department && !launched.some((d) => d.department === view.department)) {
      select.append(el("option", { value: view.department }, view.department));
    }
    choose(select, view.department);
    select.disabled = !view.hospital;
  }

  // defaultValue is the `value` attribute: a saved page keeps the dates too.
  function fillDates(view) {
    const from = document.getElementById("pick-from");
    const through = document.getElementById("pick-through");
    from.defaultValue = from.value = view.from;
    through.defaultValue = through.value = view.to ? shiftDay(view.to, -1) : "";
  }

  // The view the form asks for, or null when the hospital typed is not one (explained).
  function viewFromForm() {
    const through = validDay(document.getElementById("pick-through").value);
    const hospital = pickedHospital();
    if (hospital === null) return null;
    return {
      hospital: hospital,
      department: hospital ? document.getElementById("pick-department").value : "",
      from: validDay(document.getElementById("pick-from").value),
      to: through ? shiftDay(through, 1) : "",
    };
  }

  function go(view) {
    if (!view) return;
    history.pushState(null, "", location.pathname + viewQuery(view, ["hospital", "department", "from", "to"]));
    load();
  }

  // --- figures ----------------------------------------------------------------------------

  // A figure: its plain name, its value (a unit after a space is drawn smaller) and one line
  // saying what it counts.
  function figure(key, label, value, explanation, tone) {
    const attrs = { class: "figure" + (tone ? " " + tone : ""), id: "fig-" + key };
    const shown = el("div", { class: "value" + (value === NO_DATA ? " none" : "") });
    const space = value === NO_DATA ? -1 : value.indexOf(" ");
    if (space < 0) shown.textContent = value;
    else shown.append(value.slice(0, space), el("span", { class: "unit" }, value.slice(space)));
    return el("div", attrs, el("div", { class: "label" }, label), shown,
      el("p", { class: "explain" }, explanation));
  }

  function put(id, ...figures) {
    document.getElementById(id).replaceChildren(...figures);
  }

  function renderFigures(a) {
    const r = a.reach, e = a.effectiveness, ad = a.adoption, im = a.implementation, m = a.maintenance;
    put("reach-figures",
      figure("interactions", "Support conversations", number(r.interactions),
        "Between a peer supporter and a physician, in this period."),
      figure("reach-rate", "Physicians reached", percent(r.reach_rate),
        r.physicians_supported + " of the " + r.eligible_physicians + " eligible physicians had a conversation."),
      figure("physicians-supported", "Physicians supported", number(r.physicians_supported),
        "Different physicians with at least one conversation."),
      figure("eligible", "Eligible physicians", number(r.eligible_physicians),
        "Physicians in departments running the program."),
      figure("referrals", "Referrals", number(r.referrals),
        "Requests to offer a physician support."),
      figure("minutes", "Typical conversation", number(r.minutes_median, "minutes"),
        missing(r.minutes_median) ? "No conversation in this period."
          : "Half were shorter, half longer (" + r.minutes_min + " to " + r.minutes_max + " minutes)."),
      figure("trained", "Supporters trained", number(r.supporters_trained),
        "Colleagues who finished the training in this period."));

    const declined = Object.values(im.decline_reasons || {}).reduce((s, n) => s + n, 0);
    put("acceptance-figures",
      figure("acceptance", "Accepted the offer", percent(ad.outreach_acceptance_rate),
        "Of the physicians who answered the first call, the share who said yes."),
      figure("declined", "Declined the offer", number(declined),
        "Physicians who said no thank you when first contacted."));

    const ratio = im.physicians_per_active_supporter;
    put("implementation-figures",
      figure("within-48h", "Contacted within 48 hours", percent(im.outreach_within_48h_rate),
        "Referrals first contacted within 48 hours, the program's standard."),
      figure("hours-to-outreach", "Typical time to first contact", number(im.hours_to_outreach_median, "hours"),
        "Half the referrals were contacted sooner than this."),
      figure("ratio", "Physicians per supporter", number(ratio),
        "Per active supporter; the goal is " + RATIO_GOAL + " or fewer.",
        missing(ratio) ? "" : ratio <= RATIO_GOAL ? "good" : "warn"),
      figure("without-supporter", "Referrals with no supporter", number(im.referrals_without_supporter),
        "No trained supporter could be found for them.",
        im.referrals_without_supporter > 0 ? "warn" : ""),
      figure("supporters-available", "Supporters available", number(im.supporters_available),
        "Active supporters not paused (on leave) at the end of the period."));

    put("maintenance-figures",
      figure("retention", "Supporters still active", percent(m.supporter_retention_rate),
        "Of everyone trained so far, the share still serving."),
      figure("supporters-active", "Active supporters", number(m.supporters_active),
        "Trained and not retired at the end of the period."),
      figure("departments-active", "Departments still running it", percent(m.departments_active_rate),
        "Of the departments that launched it, the share that have not stopped."));

    put("effectiveness-figures",
      figure("respondents", "Surveyed after support", number(e.respondents_with_interaction),
        "Answers from physicians who had a conversation; the rates are among them."),
      figure("helpful", "Found it helpful", percent(e.helpful_rate),
        "Rated it 4 or 5 out of 5."),
      figure("wellbeing", "Felt better", percent(e.wellbeing_improved_rate),
        "Said their well-being improved."),
      figure("comfort", "More at ease with emotions", percent(e.comfort_improved_rate),
        "Said talking about emotions became easier."),
      figure("escalation", "Helped on to further care", percent(e.escalation_rate),
        "Conversations that led on to more help, such as the employee assistance program or mental health care."));

    put("adoption-figures",
      figure("hospitals", "Hospitals taking part", number(ad.hospitals_adopted),
        "Hospitals with a department running the program."),
      figure("departments", "Departments launched", number(ad.departments_launched),
        "Started the program, including any that stopped."),
      figure("coverage", "Physicians covered", percent(ad.physician_coverage),
        "Share of the hospitals' physicians in a department running it."),
      figure("no-referrals", "Departments without a referral", number(ad.departments_without_referrals),
        "Running the program, but no referral in this period."),
      figure("recommend", "Would recommend it", percent(ad.would_recommend_rate),
        "Of the survey respondents who knew the program."));
  }

  // --- charts -----------------------------------------------------------------------------

  function widthOf(container, fallback) {
    return Math.max(280, Math.floor(container.clientWidth || fallback));
  }

  // A round step (1, 2 or 5 times a power of ten, at least 1: counts are whole) for about
  // four grid lines, and the top of the axis at a whole number of steps.
  function axis(max) {
    const rough = Math.max(max, 1) / 4;
    const power = Math.pow(10, Math.floor(Math.log10(rough)));
    const step = Math.max(1, [1, 2, 5, 10].map((k) => k * power).find((s) => s >= rough));
    return { step: step, top: Math.max(step, Math.ceil(max / step) * step) };
  }

  // Vertical bars: items are {key, label, value, title, axis} where axis is an extra label
  // line (the year under January).
  function columnChart(container, items, options) {
    container.replaceChildren();
    if (!items.length) {
      container.append(el("p", { class: "empty" }, NO_DATA));
      return null;
    }
    const width = widthOf(container, 900);
    const height = options.height || 220;
    const left = 44, right = 8, top = 22, bottom = 44;
    const plotW = width - left - right, plotH = height - top - bottom;
    const { step, top: max } = axis(Math.max(...items.map((i) => i.value)));
    const slot = plotW / items.length;
    const barW = Math.max(2, slot * 0.72);
    const chart = svg("svg", {
      width: width, height: height, viewBox: "0 0 " + width + " " + height,
      role: "img", "aria-label": options.label, class: "columns", id: options.id,
    });
    chart.append(svg("title", {}, options.label));
    for (let v = 0; v <= max; v += step) {
      const y = top + plotH - (plotH * v) / max;
      chart.append(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
      chart.append(svg("text", { x: left - 6, y: y + 4, class: "tick", "text-anchor": "end" }, v));
    }
    const labelEvery = Math.max(1, Math.ceil(34 / slot));
    container.append(chart); // drawn, so each label can be measured as it is placed
    const placed = [];
    const notes = [];
    items.forEach((item, i) => {
      const h = (plotH * item.value) / max;
      const x = left + slot * i + (slot - barW) / 2;
      const bar = svg("rect", {
        x: x, y: top + plotH - h, width: barW, height: Math.max(h, 0), class: "bar",
        "data-key": item.key, "data-value": item.value,
      });
      bar.append(svg("title", {}, item.title));
      chart.append(bar);
      const cx = x + barW / 2;
      if (slot >= 22 || options.values) {
        label(chart, placed, { x: cx, y: top + plotH - h - 5, class: "bar-value" },
          [number(item.value)]);
      }
      if (i % labelEvery === 0) {
        label(chart, placed, { x: cx, y: height - bottom + 16, class: "tick" }, [item.label]);
      }
      if (item.axis) {
        notes.push({ attrs: { x: cx, y: height - bottom + 32, class: "tick strong axis-note" },
          texts: [item.axis, item.axisShort].filter(Boolean), title: item.axisTitle || item.axis });
      }
    });
    labelRow(chart, placed, notes);
    return chart;
  }

  const overlapping = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;

  function boxOf(node) {
    const box = node.getBBox ? node.getBBox() : null;
    if (!box || !box.width) return null; // not drawn (a hidden page): nothing to measure
    return { left: box.x - 2, right: box.x + box.width + 2, top: box.y, bottom: box.y + box.height };
  }

  // A row of notes in one form for all (the full one, else the short one) where they all fit
  // side by side; else each note where it fits, the others left out (their columns' tooltips
  // keep them).
  function labelRow(chart, placed, notes) {
    const forms = Math.max(0, ...notes.map((n) => n.texts.length));
    for (let form = 0; form < forms; form++) {
      const nodes = notes.map((n) => {
        const node = svg("text", { ...n.attrs, "text-anchor": "middle" }, n.texts[Math.min(form, n.texts.length - 1)]);
        if (n.title) node.append(svg("title", {}, n.title));
        chart.append(node);
        return node;
      });
      const boxes = nodes.map(boxOf);
      if (boxes.some((b) => !b)) return; // unmeasurable: drawn in the first form
      const clash = boxes.some((b, i) => placed.some((p) => overlapping(p, b)) ||
        boxes.slice(i + 1).some((other) => overlapping(b, other)));
      if (!clash) {
        placed.push(...boxes);
        return;
      }
      nodes.forEach((node) => node.remove());
    }
    for (const n of notes) label(chart, placed, n.attrs, n.texts.slice(-1), n.title);
  }

  // A label under or over a column, drawn only where it overlaps no label already placed:
  // the first of `texts` (longest first) that fits, else none; the whole text is its tooltip.
  // Unmeasurable (a hidden page): drawn in its first form.
  function label(chart, placed, attrs, texts, title) {
    const node = svg("text", { ...attrs, "text-anchor": "middle" });
    chart.append(node);
    for (const text of texts) {
      node.textContent = text;
      if (title) node.append(svg("title", {}, title));
      const room = boxOf(node);
      if (!room) return node;
      if (!placed.some((p) => overlapping(p, room))) {
        placed.push(room);
        return node;
      }
    }
    node.remove();
    return null;
  }

  // Horizontal bars, one row per item {key, label, value}, with the value after the bar.
  function rowChart(container, items, id, label) {
    container.replaceChildren();
    const shown = items.filter((i) => i.value > 0);
    if (!shown.length) {
      container.append(el("p", { class: "empty" }, "None in this period."));
      return;
    }
    const width = widthOf(container, 500);
    const rowH = 26, labelW = Math.min(200, width * 0.42), valueW = 44;
    const height = rowH * shown.length + 4;
    const max = Math.max(...shown.map((i) => i.value));
    const chart = svg("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height,
      role: "img", "aria-label": label, class: "rows", id: id });
    chart.append(svg("title", {}, label));
    shown.forEach((item, i) => {
      const y = i * rowH + 2;
      const w = Math.max(2, ((width - labelW - valueW - 12) * item.value) / max);
      chart.append(svg("text", { x: labelW - 8, y: y + 17, class: "row-label", "text-anchor": "end" }, item.label));
      const bar = svg("rect", { x: labelW, y: y + 3, width: w, height: rowH - 8, class: "bar",
        "data-key": item.key, "data-value": item.value });
      bar.append(svg("title", {}, item.label + ": " + item.value));
      chart.append(bar);
      chart.append(svg("text", { x: labelW + w + 6, y: y + 17, class: "bar-value" }, number(item.value)));
    });
    container.append(chart);
  }

  // A scale from 0 with the goal marked: the bar is green at or under the goal.
  function ratioChart(container, ratio) {
    container.replaceChildren();
    if (missing(ratio)) {
      container.append(el("p", { class: "empty" }, NO_DATA + ": no active supporter or no eligible physician"));
      return;
    }
    const width = widthOf(container, 500), height = 70, left = 10, right = 10;
    const top = axis(Math.max(ratio, RATIO_GOAL) * 1.25).top;
    const scale = (v) => left + ((width - left - right) * v) / top;
    const chart = svg("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height,
      role: "img", class: "ratio", id: "ratio-svg",
      "aria-label": number(ratio) + " physicians per active supporter; goal " + RATIO_GOAL + " or fewer" });
    chart.append(svg("rect", { x: left, y: 18, width: width - left - right, height: 22, class: "track" }));
    chart.append(svg("rect", { x: left, y: 18, width: Math.max(2, scale(ratio) - left), height: 22,
      class: ratio <= RATIO_GOAL ? "bar good" : "bar warn", "data-value": ratio }));
    const goalX = scale(RATIO_GOAL);
    chart.append(svg("line", { x1: goalX, x2: goalX, y1: 10, y2: 48, class: "goal" }));
    chart.append(svg("text", { x: goalX, y: 62, class: "tick strong", "text-anchor": "middle" },
      "goal: " + RATIO_GOAL));
    chart.append(svg("text", { x: left, y: 12, class: "tick" }, "0"));
    chart.append(svg("text", { x: width - right, y: 12, class: "tick", "text-anchor": "end" }, top));
    container.append(chart);
    const verdict = ratio <= RATIO_GOAL
      ? "Goal met: each supporter covers " + number(ratio) + " physicians."
      : "Above the goal: each supporter covers " + number(ratio) +
        " physicians. Training more supporters would bring this down.";
    container.append(el("p", { class: "note" }, verdict));
  }

  function renderCharts(a) {
    const monthly = a.reach.monthly || [];
    const months = monthly.map((m, i) => {
      const [y, mm] = m.month.split("-").map(Number);
      return {
        key: m.month, value: m.interactions, label: MONTHS[mm - 1],
        title: monthWords(m.month) + ": " + m.interactions + " " + plural(m.interactions, "conversation", "conversations"),
        axis: mm === 1 || i === 0 ? String(y) : "",
      };
    });
    const monthlyChart = columnChart(document.getElementById("monthly-chart"), months,
      { id: "monthly-svg", height: 230, label: "Support conversations per month" });
    if (monthlyChart) monthlyChart.setAttribute("data-total", a.reach.interactions);
    document.getElementById("monthly-note").textContent = monthly.length
      ? "In total " + number(a.reach.interactions) + " conversations over " + monthly.length + " " +
        plural(monthly.length, "month", "months") + ": on average " + number(a.reach.monthly_mean) +
        " a month (fewest " + number(a.reach.monthly_min) + ", most " + number(a.reach.monthly_max) + ")."
      : "";

    const sources = a.reach.referrals_by_source || {};
    rowChart(document.getElementById("sources-chart"),
      Object.keys(sources).map((k) => ({ key: k, label: SOURCE_WORDS[k] || k, value: sources[k] })),
      "sources-svg", "Where referrals came from");

    const byDepartment = a.reach.interactions_by_department || {};
    rowChart(document.getElementById("departments-chart"),
      Object.keys(byDepartment).sort((x, y) => byDepartment[y] - byDepartment[x])
        .map((k) => ({ key: k, label: k, value: byDepartment[k] })),
      "departments-svg", "Support conversations by department");

    const declines = a.implementation.decline_reasons || {};
    rowChart(document.getElementById("declines-chart"),
      Object.keys(declines).map((k) => ({ key: k, label: DECLINE_WORDS[k] || k, value: declines[k] })),
      "declines-svg", "Reasons physicians gave for declining");

    ratioChart(document.getElementById("ratio-chart"), a.implementation.physicians_per_active_supporter);

    const years = a.maintenance.interactions_by_program_year || [];
    const rates = a.maintenance.monthly_rate_by_program_year || [];
    columnChart(document.getElementById("years-chart"), years.map((n, i) => ({
      key: String(i + 1), value: n, label: "Year " + (i + 1),
      title: "Program year " + (i + 1) + ": " + n + " conversations",
      axis: missing(rates[i]) ? "" : number(rates[i]) + " a month",
      axisShort: missing(rates[i]) ? "" : number(rates[i]) + "/mo",
      axisTitle: missing(rates[i]) ? "" : "Program year " + (i + 1) + ": " + number(rates[i]) +
        " conversations a month on average",
    })), { id: "years-svg", height: 190, values: true, label: "Support conversations per program year" });
  }

  // --- the page ---------------------------------------------------------------------------

  function describe(a) {
    const scope = a.scope.level === "region" ? "the whole region"
      : a.scope.level === "hospital" ? "hospital " + a.scope.hospital + ", all departments"
        : "hospital " + a.scope.hospital + ", department " + a.scope.department;
    const first = a.reach.monthly && a.reach.monthly.length ? a.reach.monthly[0].month : null;
    const start = a.period.from ? "from " + dayWords(a.period.from)
      : first ? "since the program started (" + monthWords(first) + ")" : "since the start";
    const end = !a.period.to ? " to the latest record"
      : a.period.from && a.period.from >= a.period.to
        ? " (nothing was recorded after " + dayWords(shiftDay(a.period.to, -1)) + ")"
        : " through " + dayWords(shiftDay(a.period.to, -1));
    return "Showing " + scope + ", " + start + end + ".";
  }

  function render(a) {
    renderFigures(a);
    renderCharts(a);
  }

  async function fetchJson(path) {
    const response = await fetch(path, {
      headers: { Accept: "application/json", Authorization: "Bearer " + token },
      credentials: "omit",
      cache: "no-store",
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : "the service answered " + response.status;
      const text = typeof detail === "string" ? detail : JSON.stringify(detail);
      throw response.status === 401 ? new TokenRefused(text) : new Error(text);
    }
    return body;
  }

  // --- the hospitals side by side (region view) -----------------------------------------

  function figureWords(key) {
    return FIGURE_WORDS[key] || key;
  }

  function figureValue(key, value) {
    return /(_rate|_coverage)$/.test(key) ? percent(value) : number(value);
  }

  // The region's hospitals by one figure, a page at a time, sorted by the service.
  async function loadRanking(view) {
    const panel = document.getElementById("ranking-panel");
    const region = holder && holder.kind === "region" && !view.hospital;
    panel.hidden = !region;
    if (!region) return;
    const ticket = ++rankLoads;
    const period = view.from + "/" + view.to;
    if (period !== ranking.period) ranking.offset = 0; // another period: from its first page
    ranking.period = period;
    panel.dataset.state = "loading";
    const status = document.getElementById("ranking-status");
    status.textContent = "Loading…";
    const query = new URLSearchParams({
      figure: ranking.figure, order: ranking.order, limit: String(RANK_PAGE),
      offset: String(ranking.offset),
    });
    if (view.from) query.set("from", view.from);
    if (view.to) query.set("to", view.to);
    try {
      const answer = await fetchJson("reaim-hospitals?" + query.toString());
      if (ticket !== rankLoads) return;
      drawRanking(answer, view);
      status.textContent = "";
      panel.dataset.state = "ready";
    } catch (error) {
      if (ticket !== rankLoads) return;
      document.getElementById("ranking-rows").replaceChildren();
      status.textContent = "The hospitals could not be listed: " + error.message + ".";
      panel.dataset.state = "error";
    }
  }

  function drawRanking(answer, view) {
    const select = document.getElementById("ranking-figure");
    if (ranking.figures.join() !== answer.figures.join()) {
      ranking.figures = answer.figures;
      select.replaceChildren(...answer.figures.map((k) => el("option", { value: k }, figureWords(k))));
    }
    choose(select, answer.figure);
    const words = figureWords(answer.figure);
    document.getElementById("ranking-title").textContent = "Hospitals by " + words.toLowerCase();
    const head = document.getElementById("ranking-value-head");
    const down = answer.order === "desc";
    head.setAttribute("aria-sort", down ? "descending" : "ascending");
    const sort = document.getElementById("ranking-sort");
    sort.textContent = words + (down ? " ▼" : " ▲");
    sort.title = down ? "Highest first: click for the lowest first" : "Lowest first: click for the highest first";
    const rows = answer.hospitals.map((entry, i) => {
      const target = { hospital: entry.hospital, department: "", from: view.from, to: view.to };
      const link = el("a", { href: location.pathname + viewQuery(target, ["hospital", "from", "to"]),
        class: "hospital-link", "data-hospital": entry.hospital }, entry.hospital);
      link.addEventListener("click", (event) => {
        event.preventDefault();
        go(target);
      });
      return el("tr", { "data-hospital": entry.hospital, "data-value": missing(entry.value) ? "" : entry.value },
        el("td", { class: "rank" }, answer.offset + i + 1), el("td", {}, link),
        el("td", { class: "value" + (missing(entry.value) ? " none" : "") }, figureValue(answer.figure, entry.value)));
    });
    document.getElementById("ranking-rows").replaceChildren(...rows);
    const first = answer.total ? answer.offset + 1 : 0;
    const last = answer.offset + answer.hospitals.length;
    document.getElementById("ranking-page").textContent = answer.hospitals.length
      ? first.toLocaleString("en-US") + "–" + last.toLocaleString("en-US") + " of " +
        answer.total.toLocaleString("en-US") + " " + plural(answer.total, "hospital", "hospitals")
      : answer.total ? "No hospital on this page" : "No hospital yet";
    document.getElementById("ranking-prev").disabled = answer.offset <= 0;
    document.getElementById("ranking-next").disabled = last >= answer.total;
  }

  // --- the token --------------------------------------------------------------------------

  function takeToken() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const given = fragment.get("token");
    if (given) {
      setToken(given.trim());
      // Not left in the address bar, the history or a bookmark.
      history.replaceState(null, "", location.pathname + location.search);
      return;
    }
    try {
      token = sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (error) {
      token = "";
    }
  }

  function setToken(value) {
    token = value;
    holder = null;
    hospitals = [];
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (error) {
      // No storage (a private window's policy): the token lives as long as the page.
    }
  }

  function askToken(why) {
    document.getElementById("token-form").hidden = false;
    document.getElementById("filters").hidden = true;
    document.getElementById("holder").hidden = true;
    document.getElementById("dashboard").hidden = true;
    document.getElementById("showing").textContent = "";
    document.getElementById("status").textContent = why ||
      "Enter an API token to see the figures.";
    document.body.dataset.state = "token";
    document.getElementById("token-input").focus();
  }

  function showHolder() {
    document.getElementById("token-form").hidden = true;
    document.getElementById("filters").hidden = false;
    document.getElementById("holder").hidden = false;
    document.getElementById("holder-text").textContent = holder.kind === "region"
      ? "With the region token “" + holder.name + "”: every hospital."
      : "With the token of hospital " + holder.name + ": this hospital and its departments.";
  }

  // What the token may read: its own hospital for a hospital's token, whatever was asked.
  function allowed(view) {
    if (holder.kind === "region" || view.hospital === holder.name) return view;
    return { hospital: holder.name, department: "", from: view.from, to: view.to };
  }

  async function listFor() {
    if (holder.kind === "region") return fetchJson("hospitals");
    // A hospital that has sent nothing yet has no entry: its own name, no department.
    const entry = await fetchJson("hospitals/" + encodeURIComponent(holder.name))
      .catch((error) => {
        if (error instanceof TokenRefused) throw error;
        return { hospital: holder.name, departments: [] };
      });
    return [entry];
  }

  async function load() {
    // Only the latest request may draw: a slow earlier answer must not overwrite it.
    const ticket = ++loads;
    if (!token) {
      askToken("");
      return;
    }
    const status = document.getElementById("status");
    const main = document.getElementById("dashboard");
    document.body.dataset.state = "loading";
    status.textContent = "Loading the figures…";
    let view = readView();
    try {
      if (!holder) holder = await fetchJson("whoami");
      if (ticket !== loads) return;
      showHolder();
      const asked = view;
      view = allowed(view);
      if (view !== asked) {
        history.replaceState(null, "", location.pathname + viewQuery(view, ["hospital", "department", "from", "to"]));
      }
      fillDates(view);
      const path = apiPath(view);
      document.getElementById("json-link").setAttribute("href", path);
      const [list, answer] = await Promise.all([listFor(), fetchJson(path)]);
      if (ticket !== loads) return;
      hospitals = list;
      fillHospitals(view);
      lastAnswer = answer;
      document.getElementById("showing").textContent = describe(answer);
      main.hidden = false;
      render(answer);
      loadRanking(view);
      status.textContent = hospitals.length ? "" : "No hospital has sent any records yet.";
      document.body.dataset.state = "ready";
    } catch (error) {
      if (error instanceof TokenRefused) {
        if (ticket !== loads) return;
        setToken("");
        askToken("This token was refused (" + error.message + "): enter another one.");
        return;
      }
      if (!holder) {
        if (ticket !== loads) return;
        askToken("The token could not be checked: " + error.message + ".");
        return;
      }
      if (!hospitals.length) {
        hospitals = await listFor().catch(() => []);
      }
      if (ticket !== loads) return;
      fillHospitals(view);
      document.getElementById("ranking-panel").hidden = true;
      main.hidden = true;
      document.getElementById("showing").textContent = "";
      status.textContent = "These figures could not be shown: " + error.message + ".";
      document.body.dataset.state = "error";
    }
  }

  function start() {
    takeToken();
    document.getElementById("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = document.getElementById("token-input");
      setToken(input.value.trim());
      input.value = "";
      load();
    });
    document.getElementById("forget-token").addEventListener("click", () => {
      setToken("");
      load();
    });
    window.addEventListener("hashchange", () => {
      if (new URLSearchParams(location.hash.slice(1)).get("token")) {
        takeToken();
        load();
      }
    });
    const form = document.getElementById("filters");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      go(viewFromForm());
    });
    const picker = document.getElementById("pick-hospital");
    const pick = () => {
      const view = viewFromForm();
      if (!view || view.hospital === readView().hospital) return; // unknown, or shown already
      view.department = "";
      go(view);
    };
    picker.addEventListener("input", (event) => {
      typing();
      // A suggestion taken from the list replaces the whole text: open it at once.
      if (event.inputType === "insertReplacementText" && known.has(picker.value.trim())) pick();
    });
    picker.addEventListener("change", pick); // Enter, or leaving the field
    picker.addEventListener("search", pick); // Enter, or the clear button of a search field
    document.getElementById("ranking-figure").addEventListener("change", (event) => {
      ranking.figure = event.target.value;
      ranking.offset = 0;
      loadRanking(readView());
    });
    document.getElementById("ranking-sort").addEventListener("click", () => {
      ranking.order = ranking.order === "desc" ? "asc" : "desc";
      ranking.offset = 0;
      loadRanking(readView());
    });
    document.getElementById("ranking-prev").addEventListener("click", () => {
      ranking.offset = Math.max(0, ranking.offset - RANK_PAGE);
      loadRanking(readView());
    });
    document.getElementById("ranking-next").addEventListener("click", () => {
      ranking.offset += RANK_PAGE;
      loadRanking(readView());
    });
    document.getElementById("pick-department").addEventListener("change", () => go(viewFromForm()));
    document.getElementById("all-time").addEventListener("click", () => {
      const view = viewFromForm();
      if (!view) return; // a hospital typed that is none: explained, nothing changes
      view.from = view.to = "";
      go(view);
    });
    window.addEventListener("popstate", load);
    let pending = 0;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => lastAnswer && document.body.dataset.state === "ready" && renderCharts(lastAnswer), 150);
    });
    load();
  }

  start();
})();
