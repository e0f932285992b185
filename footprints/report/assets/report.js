/* footprints report: builds the maps from the JSON embedded in the page (no network, no modules).
 * window.footprintsReport exposes what the page drew (maps, layer counts, scene bounds) so that a test,
 * or a curious user in the console, can check it. */
(function () {
  "use strict";
  var state = { ready: false, maps: {}, groups: {}, sceneBounds: {}, sceneKind: {}, errors: [] };
  window.footprintsReport = state;

  var data = JSON.parse(document.getElementById("report-data").textContent);
  var COLOURS = { TP: "#1a9641", FP: "#d7191c", FN: "#ff7f00", truthTP: "#5a5a5a", none: "#3388ff" };
  var PROB_CLASSES = [[0.5, "#ffffb2"], [0.6, "#fecc5c"], [0.7, "#fd8d3c"], [0.8, "#f03b20"], [0.9, "#bd0026"],
    [Infinity, "#800026"]];  // the GeoPackage's QGIS style uses the same classes

  function probColour(p) {
    if (typeof p !== "number" || isNaN(p)) { return COLOURS.none; }
    for (var i = 0; i < PROB_CLASSES.length; i++) { if (p < PROB_CLASSES[i][0]) { return PROB_CLASSES[i][1]; } }
    return PROB_CLASSES[PROB_CLASSES.length - 1][1];
  }

  function predStyle(f) {
    var s = f.properties.status;
    var c = s === "TP" ? COLOURS.TP : (s === "FP" ? COLOURS.FP : probColour(f.properties.mean_prob));
    return { color: c, weight: 1.5, opacity: 0.95, fillColor: c, fillOpacity: 0.3, className: "fp-pred" };
  }

  // damage grades (a run graded by the damage stage): data.damage holds the grades, colours and counts
  var DAMAGE = data.damage || null;

  function damageColours(grade) {
    return DAMAGE.colours[DAMAGE.grades.indexOf(grade) >= 0 ? grade : DAMAGE.other];
  }

  function damageStyle(f) {
    var c = damageColours(f.properties.damage);
    return { color: c.outline, weight: 1.5, opacity: 0.95, fillColor: c.fill, fillOpacity: DAMAGE.fill_opacity,
      className: "fp-damage" };
  }

  function truthStyle(f) {
    if (f.properties.status === "FN") {
      return { color: COLOURS.FN, weight: 2, dashArray: "5 4", fill: false, className: "fp-truth-fn" };
    }
    return { color: COLOURS.truthTP, weight: 1, fill: false, className: "fp-truth-tp" };
  }

  function fmt(v, nd) {
    return (typeof v === "number" && isFinite(v)) ? v.toFixed(nd) : (v === undefined || v === null ? "–" : String(v));
  }

  function popupContent(f) {
    var p = f.properties;
    var rows = [["scene", p.scene], ["area", fmt(p.area_m2, 1) + " m²"], ["mean probability", fmt(p.mean_prob, 3)]];
    if (p.max_prob !== undefined) { rows.push(["max probability", fmt(p.max_prob, 3)]); }
    if (p.kind === "truth") { rows = [["scene", p.scene], ["truth outline", p.status === "FN" ? "missed (FN)" : "found (TP)"]]; }
    else if (p.status) { rows.push(["match", p.status + (p.iou !== undefined ? " (IoU " + fmt(p.iou, 2) + ")" : "")]); }
    return popupTable(rows);
  }

  function damagePopup(f) {  // a graded footprint: its grade and each grade's probability
    var p = f.properties;
    var known = DAMAGE.grades.indexOf(p.damage) >= 0;
    var rows = [["scene", p.scene], ["damage grade",
      known ? p.damage : (typeof p.damage === "string" ? p.damage : DAMAGE.labels[DAMAGE.other])],
      ["area", fmt(p.area_m2, 1) + " m²"]];
    DAMAGE.grades.forEach(function (g) {
      var k = DAMAGE.probability_keys[g];
      if (p[k] !== undefined) { rows.push(["p(" + g + ")", fmt(p[k], 3)]); }
    });
    return popupTable(rows);
  }

  function popupTable(rows) {
    var table = document.createElement("table");
    table.className = "popup-table";
    rows.forEach(function (r) {
      var tr = table.insertRow();
      var th = document.createElement("th");
      th.textContent = r[0];
      tr.appendChild(th);
      tr.insertCell().textContent = r[1] === undefined ? "–" : r[1];
    });
    return table;
  }

  function textNode(text) {  // never innerHTML: scene ids come from file names
    var span = document.createElement("span");
    span.textContent = text;
    return span;
  }

  function toLatLng(frame) {
    return function (c) { return L.latLng(frame.flip ? -c[1] : c[1], c[0] + frame.dx); };
  }

  function legend(map, kind) {
    var ctl = L.control({ position: "bottomright" });
    ctl.onAdd = function () {
      var div = L.DomUtil.create("div", "legend");
      var html = [];
      var matched = data.scenes.some(function (s) { return s.kind === kind && s.has_matches; });
      if (matched) {
        html.push('<i style="border-color:' + COLOURS.TP + ';background:' + COLOURS.TP + '55"></i>TP prediction');
        html.push('<i style="border-color:' + COLOURS.FP + ';background:' + COLOURS.FP + '55"></i>FP prediction');
      }
      var missed = data.scenes.some(function (s) { return s.kind === kind && s.truth.length; });
      if (missed) { html.push('<i style="border-color:' + COLOURS.FN + ';border-style:dashed"></i>missed truth (FN)'); }
      var unmatched = data.scenes.some(function (s) { return s.kind === kind && !s.has_matches; });
      if (unmatched) {
        html.push("mean probability: " + PROB_CLASSES.map(function (c, i) {
          return '<i style="border-color:' + c[1] + ';background:' + c[1] + '" title="' +
            (i ? PROB_CLASSES[i - 1][0] : 0) + "–" + (isFinite(c[0]) ? c[0] : 1) + '"></i>';
        }).join(""));
      }
      var graded = DAMAGE && data.scenes.some(function (s) { return s.kind === kind && s.damage && s.damage.length; });
      if (graded) {
        html.push("damage grade:");
        DAMAGE.grades.concat(DAMAGE.counts[DAMAGE.other] ? [DAMAGE.other] : []).forEach(function (g) {
          var c = DAMAGE.colours[g];
          html.push('<i class="damage-swatch" data-grade="' + g + '" style="border-color:' + c.outline + ';background:' +
            c.fill + '"></i>' + DAMAGE.labels[g]);
        });
      }
      html.push('probability raster: 0<span class="ramp"></span>1');
      div.innerHTML = html.join("<br>");
      return div;
    };
    ctl.addTo(map);
  }

  function buildMap(kind, elementId) {
    var scenes = data.scenes.filter(function (s) { return s.kind === kind; });
    var el = document.getElementById(elementId);
    if (!scenes.length || !el) { return null; }
    var simple = kind === "pixel";
    var map = L.map(el, {
      crs: simple ? L.CRS.Simple : L.CRS.EPSG3857, zoomSnap: 0.25, preferCanvas: !!data.use_canvas,
      minZoom: simple ? -12 : 1, maxZoom: simple ? 8 : 23
    });
    map.createPane("imagery").style.zIndex = 250;
    map.createPane("post").style.zIndex = 260;  // a damage run's post-disaster imagery: over the pre imagery
    map.createPane("probability").style.zIndex = 300;
    map.createPane("scenes").style.zIndex = 350;  // below the footprints, which keep their clicks
    map.attributionControl.addAttribution("footprints report");
    var g = {
      imagery: L.layerGroup(), post: L.layerGroup(), probability: L.layerGroup(), footprints: L.featureGroup(),
      missed: L.featureGroup(), found: L.featureGroup(), scenes: L.featureGroup(), damage: L.featureGroup()
    };
    var all = null;
    var largest = 0;
    var markers = [];
    scenes.forEach(function (s) {
      var conv = toLatLng(s.frame);
      if (s.image) {
        L.imageOverlay(s.image.uri, s.image.bounds, { pane: "imagery", className: "scene-image", interactive: false,
          alt: "imagery of " + s.id }).addTo(g.imagery);
      }
      if (s.post) {  // on the same corners as s.image: the layer control flips between before and after
        L.imageOverlay(s.post.uri, s.post.bounds, { pane: "post", className: "scene-post-image", interactive: false,
          alt: "post-disaster imagery of " + s.id }).addTo(g.post);
      }
      if (s.prob) {
        L.imageOverlay(s.prob.uri, s.prob.bounds, { pane: "probability", className: "scene-prob",
          interactive: false, alt: "building probability of " + s.id }).addTo(g.probability);
      }
      var fc = function (features) { return { type: "FeatureCollection", features: features }; };
      L.geoJSON(fc(s.footprints), {
        style: predStyle, coordsToLatLng: conv,
        onEachFeature: function (f, layer) { layer.bindPopup(function () { return popupContent(f); }); }
      }).addTo(g.footprints);
      if (s.damage && s.damage.length && DAMAGE) {
        L.geoJSON(fc(s.damage), {
          style: damageStyle, coordsToLatLng: conv,
          onEachFeature: function (f, layer) { layer.bindPopup(function () { return damagePopup(f); }); }
        }).addTo(g.damage);
      }
      var fn = s.truth.filter(function (f) { return f.properties.status === "FN"; });
      var tp = s.truth.filter(function (f) { return f.properties.status !== "FN"; });
      [[fn, g.missed], [tp, g.found]].forEach(function (pair) {
        if (pair[0].length) {
          L.geoJSON(fc(pair[0]), {
            style: truthStyle, coordsToLatLng: conv, onEachFeature: function (f, layer) {
              layer.bindPopup(function () { return popupContent(f); });
            }
          }).addTo(pair[1]);
        }
      });
      if (s.bounds) {
        var b = L.latLngBounds(s.bounds);
        state.sceneBounds[s.id] = b;
        state.sceneKind[s.id] = kind;
        all = all ? all.extend(b) : L.latLngBounds(b.getSouthWest(), b.getNorthEast());
        largest = Math.max(largest, diagonal(map, b));
        // outline and a marker that stays visible when zoomed far out; either zooms to the scene
        var zoom = function () { state.zoomTo(s.id); };
        L.rectangle(b, { pane: "scenes", color: "#2b6cb0", weight: 1, fill: false, interactive: false, className: "scene-outline" })
          .addTo(g.scenes);
        var marker = L.circleMarker(b.getCenter(), { pane: "scenes", radius: 6, color: "#2b6cb0", weight: 2,
          fillOpacity: 0.4, className: "scene-marker" }).bindTooltip(textNode(s.id), { direction: "top" }).on("click", zoom);
        marker.addTo(g.scenes);
        markers.push([marker, b]);
      }
    });
    var overlays = {};
    var count = countOf(g.footprints);
    if (g.imagery.getLayers().length) { overlays.Imagery = g.imagery; g.imagery.addTo(map); }
    if (g.post.getLayers().length) { overlays["Post-disaster imagery"] = g.post; }  // off until asked for
    if (g.probability.getLayers().length) { overlays["Building probability (raster)"] = g.probability; }
    overlays["Predicted footprints (" + count + ")"] = g.footprints;
    var nDamage = countOf(g.damage);
    // graded footprints are the predicted ones coloured by grade: shown instead of them (the layer control
    // turns either on)
    if (!nDamage) { g.footprints.addTo(map); }
    if (nDamage) { overlays["Damage grades (" + nDamage + ")"] = g.damage; g.damage.addTo(map); }
    if (g.missed.getLayers().length) { overlays["Missed truth, FN (" + countOf(g.missed) + ")"] = g.missed; g.missed.addTo(map); }
    if (g.found.getLayers().length) { overlays["Found truth, TP (" + countOf(g.found) + ")"] = g.found; }
    overlays["Scene outlines"] = g.scenes;
    g.scenes.addTo(map);
    L.control.layers(null, overlays, { collapsed: false }).addTo(map);
    if (!simple) { L.control.scale({ imperial: false }).addTo(map); }  // pixel units have no scale
    legend(map, kind);
    state.maps[kind] = map;
    state.groups[kind] = g;
    // a scene's marker only while the scene is too small on screen to see (it would hide its centre)
    map.on("zoomend", function () {
      markers.forEach(function (mb) {
        var show = map.getBoundsZoom(mb[1]) - 2 > map.getZoom();
        mb[0].setStyle({ opacity: show ? 1 : 0, fillOpacity: show ? 0.4 : 0 });
      });
    });
    var first = scenes.filter(function (s) { return s.bounds; })[0];
    if (all && first && diagonal(map, all) > 20 * largest) {
      // scenes far apart (different cities): open on the first one, the markers show the others
      map.fitBounds(state.sceneBounds[first.id], { padding: [8, 8] });
      state.opened = first.id;
    } else if (all) {
      map.fitBounds(all, { padding: [8, 8] });
      state.opened = "all";
    } else {
      map.setView([0, 0], simple ? 0 : 2);
    }
    return map;
  }

  function diagonal(map, b) {
    return map.options.crs.distance(b.getSouthWest(), b.getNorthEast());
  }

  function countOf(group) {
    var n = 0;
    group.eachLayer(function (gj) { n += gj.getLayers ? gj.getLayers().length : 1; });
    return n;
  }

  state.count = function (name) {
    var n = 0;
    Object.keys(state.groups).forEach(function (k) { n += countOf(state.groups[k][name || "footprints"]); });
    return n;
  };

  state.zoomTo = function (id) {
    var kind = state.sceneKind[id];
    var map = state.maps[kind];
    if (!map) { return false; }
    map.fitBounds(state.sceneBounds[id], { padding: [8, 8], animate: false });
    var rows = document.querySelectorAll("tr[data-scene]");
    for (var i = 0; i < rows.length; i++) { rows[i].classList.toggle("current", rows[i].getAttribute("data-scene") === id); }
    var el = map.getContainer();
    if (el.scrollIntoView) { el.scrollIntoView({ block: "nearest" }); }
    return true;
  };

  function wireTable() {
    var rows = document.querySelectorAll("tr[data-scene]");
    Array.prototype.forEach.call(rows, function (tr) {
      var id = tr.getAttribute("data-scene");
      tr.addEventListener("click", function () { state.zoomTo(id); });
      tr.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); state.zoomTo(id); }
      });
    });
  }

  function warn(text) {
    state.errors.push(text);
    var p = document.createElement("p");
    p.id = "report-warning";
    p.textContent = text;
    document.querySelector("header").appendChild(p);
    console.error("footprints report: " + text);
  }

  buildMap("geo", "map");
  buildMap("pixel", "map-pixel");
  wireTable();
  // the page states a count; check that the map drew exactly that many
  var drawn = state.count("footprints");
  if (drawn !== data.n_footprints) {
    warn("the map shows " + drawn + " footprints but the report holds " + data.n_footprints);
  }
  if (DAMAGE && state.count("damage") !== DAMAGE.n) {
    warn("the map shows " + state.count("damage") + " graded footprints but the report holds " + DAMAGE.n);
  }
  state.ready = true;
}());
