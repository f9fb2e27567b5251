-- dh-p2p.lua: Wireshark dissector for the Dahua P2P (Easy4IPCloud) tunnel.
--
-- Three heuristic dissectors on UDP (any port, nothing to configure):
--   dhp2p   cloud signalling (DHGET / DHPOST, DMSS's NFGET / NFPOST requests, HTTP-like replies), handed to
--           the HTTP dissector so the XML bodies show
--   dhpunch hole-punch messages: STUN with every byte inverted, handed un-inverted to
--           the STUN dissector
--   ptcp    the PTCP tunnel: header, every body type, and realm data handed to RTSP
--           (interleaved RTP included) or HTTP according to the port each realm was
--           bound to (preference ptcp.realm_ports), reassembled when a message spans
--           packets; the sent counters flag retransmissions, out-of-order bodies
--           (dissected once the hole fills) and gaps
--
-- GSO batches: a capture taken on a host that sends with Linux UDP GSO (ptcp.py does:
-- one sendmsg with UDP_SEGMENT for a run of datagrams to one peer; or a NIC offloading
-- UDP segmentation) shows the run as ONE datagram holding several PTCP packets back to
-- back: all of one size (the segment size) except the last, which may be shorter; at
-- most 64 of them. Such a datagram is split and each packet dissected as if it had come
-- alone (own "Dahua PTCP tunnel" subtree, sequence tracking, realm data), in order.
-- The segment size is found without the kernel's value: 24 when an ack (empty body) is
-- followed by another packet ("PTCP" at offset 24); 24 + 12 + the length field when
-- the first body is data; otherwise the smallest k >= 24 with "PTCP" at every multiple
-- of k and a last packet of 24..k bytes. When nothing fits it is one packet, as before.
-- Each packet of a batch carries the generated fields ptcp.batch.index (1..n),
-- ptcp.batch.count (n) and ptcp.batch.segment_size; filter batches with
-- "ptcp.batch.count". The Info column of a batch reads
--   PTCP x<n> (GSO batch): <first packet's sentence>, +<n-1> more: <tally>: <sub info>
-- e.g. "PTCP x49 (GSO batch): data realm 0x1a2b3c4d 1280 bytes, +48 more: 48 data
-- (61160 bytes): PT=DynamicRTP-Type-96, ..."; the tally counts the other packets by
-- body type (with their data bytes, retransmissions and out-of-order ones), and the
-- sub info is what RTSP/RTP/HTTP wrote for all of them; each packet's own sentence
-- is on its subtree.
-- Format: PROTOCOLS.md section 2 of this project. Filter examples: ptcp, ptcp.type ==
-- "data", ptcp.realm == 0x1a2b3c4d, ptcp.bind.port == 554, rtsp.request && ptcp,
-- ptcp.type == 0x100 (acks: empty bodies), _ws.expert && ptcp.
--
-- Load it with:  wireshark -X lua_script:dh-p2p.lua capture.pcap
--           or:  tshark -X lua_script:dh-p2p.lua -o udp.try_heuristic_first:TRUE -r capture.pcap
-- or copy it into the personal Lua plugins folder (Help > About Wireshark > Folders).

-- Dissectors we hand payloads to (nil when a build lacks one: we then show raw data).
local function find_dissector(name)
    local ok, d = pcall(Dissector.get, name)
    if ok then return d end
    return nil
end

local data_dissector = find_dissector("data")
local http_dissector = find_dissector("http")
local stun_dissector = find_dissector("stun-udp")
local classicstun_dissector = find_dissector("classicstun")

-- Realm data is handed to a dissector according to the TCP port the realm was bound
-- to: "PORT=name,..." (the ptcp.realm_ports preference).
local DEFAULT_REALM_PORTS = "554=rtsp,80=http"

local function parse_realm_ports(text)
    local map = {}
    for port, name in tostring(text):gmatch("(%d+)%s*=%s*([%w_%.%-]+)") do
        local d = find_dissector(name)
        if d and tonumber(port) then map[tonumber(port)] = d end
    end
    return map
end

local PORT_DISSECTORS = parse_realm_ports(DEFAULT_REALM_PORTS)

-- Sub-dissectors (HTTP, RTSP) fence the Info column; our sentence replaces it whole.
local function set_info(pinfo, text)
    pinfo.cols.info:clear_fence()
    pinfo.cols.info:set(text)
end

-- What sub-dissectors wrote into the Info column after we cleared it, or nil.
-- "(info)" is what a column reads as when tshark is not filling columns.
local function column_text(pinfo)
    local text = tostring(pinfo.cols.info)
    if text == "(info)" then return "" end
    return text
end

-- The Info column as of the last separate_sub_info() of this frame.
local fenced_info = ""

-- Before handing more realm data over in the same frame: keep what sub-dissectors wrote
-- so far, separated from what follows (when they wrote anything since the last time;
-- RTSP leaves ", " after an interleaved frame when more data follows).
local function separate_sub_info(pinfo)
    local text = column_text(pinfo)
    if text ~= fenced_info then
        if not text:match(",%s*$") then pinfo.cols.info:append(", ") end
        pinfo.cols.info:fence()
        fenced_info = column_text(pinfo)
    end
end

-- Everything sub-dissectors wrote in this frame (nil when nothing).
local function sub_info(pinfo)
    local text = column_text(pinfo):gsub(",%s*$", "")
    if text == "" then return nil end
    return text
end

-- Call a sub-dissector; it may throw on a malformed payload (Wireshark then marks the
-- packet "Malformed Packet: <proto>"), which must not surface as a Lua error.
local function call_sub(dissector, tvb, pinfo, tree)
    return pcall(dissector.call, dissector, tvb, pinfo, tree)
end

-- Bytes from the wire made safe for a label or a column: printable ASCII kept, the
-- rest written as \xNN.
local function printable(bytes)
    return (bytes:gsub("[^\32-\126]", function(c) return string.format("\\x%02x", c:byte()) end))
end

-- Ask a sub-dissector for "one more segment" (epan's DESEGMENT_ONE_MORE_SEGMENT).
local DESEGMENT_ONE_MORE_SEGMENT = 0x0fffffff

------------------------------------------------------------------------------------
-- Cloud signalling (PROTOCOLS 2.1)
------------------------------------------------------------------------------------

local dhp2p = Proto("dhp2p", "Dahua P2P cloud signalling")

local sig_f = {
    method = ProtoField.string("dhp2p.method", "Method"),
    uri = ProtoField.string("dhp2p.uri", "Request URI"),
    code = ProtoField.uint16("dhp2p.code", "Status code", base.DEC),
    cseq = ProtoField.int32("dhp2p.cseq", "CSeq", base.DEC),  -- DMSS: a random signed int32
    text = ProtoField.string("dhp2p.text", "Text"),
}
dhp2p.fields = { sig_f.method, sig_f.uri, sig_f.code, sig_f.cseq, sig_f.text }

local sig_e = {
    normalised = ProtoExpert.new("dhp2p.normalised", "Message normalised for the HTTP dissector",
        expert.group.PROTOCOL, expert.severity.NOTE),
}
dhp2p.experts = { sig_e.normalised }

-- Agent notice on the relay socket (PROTOCOLS 2.2 step 8).
local AGENT_NOTICE = "Server Nat Info!"

-- `head` is the start of the datagram, `tvb` the whole of it.
local function is_signalling(head, tvb)
    -- PROTOCOLS 2.1 (SmartPSS) and 2.7 (c) (DMSS)
    for _, method in ipairs({ "DHGET ", "DHPOST ", "NFGET ", "NFPOST " }) do
        if head:sub(1, #method) == method then return true end
    end
    if head:match("^HTTP/1%.[01] %d%d%d") then
        -- Cloud replies echo the request's CSeq; other HTTP over UDP (SSDP) has none.
        return tvb:raw():find("\r\n[Cc][Ss][Ee][Qq]:") ~= nil
    end
    return head:sub(1, #AGENT_NOTICE) == AGENT_NOTICE
end

-- Turn a signalling message into something Wireshark's HTTP dissector understands:
-- drop the "DH" of the method and give an XML body a content type. PROTOCOLS 2.1: POSTs
-- carry "Content-Type: " with an empty value and replies often carry none at all.
local function normalise_signalling(s)
    local out = s
    local prefix = out:sub(1, 2)
    if prefix == "DH" or prefix == "NF" then out = out:sub(3) end
    local head_end = out:find("\r\n\r\n", 1, true)
    if head_end then
        local head = out:sub(1, head_end + 1)
        local body = out:sub(head_end + 4)
        if body:match("^%s*<") then
            local ctype = head:match("\r\n[Cc]ontent%-[Tt]ype:[ \t]*([^\r\n]*)\r\n")
            if ctype == nil then
                head = head .. "Content-Type: text/xml\r\n"
            elseif ctype == "" then
                head = head:gsub("(\r\n[Cc]ontent%-[Tt]ype:)[ \t]*\r\n", "%1 text/xml\r\n", 1)
            end
        end
        out = head .. "\r\n" .. body
    end
    return out
end

local function dissect_signalling(tvb, pinfo, tree)
    local s = tvb:raw()
    local subtree = tree:add(dhp2p, tvb())
    pinfo.cols.protocol:set("DH-P2P")
    local first_line = s:match("^([^\r\n]*)")
    local shown_line = printable(first_line:sub(1, 200))
    if s:sub(1, #AGENT_NOTICE) == AGENT_NOTICE then
        subtree:add(sig_f.text, tvb(0, #AGENT_NOTICE))
        set_info(pinfo, "DH-P2P relay agent: " .. AGENT_NOTICE)
        return tvb:len()
    end
    local method, uri = first_line:match("^(DH%u+) (%S*)")
    if not method then method, uri = first_line:match("^(NF%u+) (%S*)") end
    local code = first_line:match("^HTTP/1%.[01] (%d%d%d)")
    if method then
        subtree:add(sig_f.method, tvb(0, #method))
        if #uri > 0 then subtree:add(sig_f.uri, tvb(#method + 1, #uri)) end
    elseif code then
        subtree:add(sig_f.code, tvb(9, 3), tonumber(code))
    end
    local _, cseq_end, cseq = s:find("\r\nCSeq:[ \t]*(%-?%d+)")
    local cseq_n = cseq and #cseq <= 11 and tonumber(cseq)
    if cseq_n and cseq_n >= -2147483648 and cseq_n <= 2147483647 then
        subtree:add(sig_f.cseq, tvb(cseq_end - #cseq, #cseq), tonumber(cseq))
    end
    set_info(pinfo, "DH-P2P " .. shown_line)
    if not http_dissector then return tvb:len() end
    local normal = normalise_signalling(s)
    local http_tvb = tvb
    if normal ~= s then
        subtree:add_proto_expert_info(sig_e.normalised,
            "Handed to HTTP without the DH/NF method prefix and with an XML content type")
        http_tvb = ByteArray.new(normal, true):tvb("DH-P2P as HTTP")
    end
    call_sub(http_dissector, http_tvb, pinfo, tree)
    pinfo.cols.protocol:set("DH-P2P")
    set_info(pinfo, "DH-P2P " .. shown_line)
    return tvb:len()
end

------------------------------------------------------------------------------------
-- Hole punch: inverted STUN (PROTOCOLS 2.3)
------------------------------------------------------------------------------------

local dhpunch = Proto("dhpunch", "Dahua P2P hole punch (inverted STUN)")

local STUN_TYPES = {
    [0x0001] = "Binding Request",
    [0x0101] = "Binding Success Response",
    [0x0111] = "Binding Error Response",
    [0x0011] = "Binding Indication",
}

local punch_f = {
    msg_type = ProtoField.uint16("dhpunch.type", "Message type", base.HEX, STUN_TYPES),
    cookie = ProtoField.uint32("dhpunch.cookie", "Cookie", base.HEX),
    tid = ProtoField.bytes("dhpunch.tid", "Transaction id"),
    identify = ProtoField.bytes("dhpunch.identify", "Identify (ICE role tie-breaker)"),
    port = ProtoField.uint16("dhpunch.port", "Address port", base.DEC),
    ip = ProtoField.ipv4("dhpunch.ip", "Address IPv4"),
}
dhpunch.fields = {
    punch_f.msg_type, punch_f.cookie, punch_f.tid, punch_f.identify, punch_f.port, punch_f.ip,
}

local STUN_MAGIC_COOKIE = 0x2112A442

local function invert(s)
    return (s:gsub(".", function(c) return string.char(255 - c:byte()) end))
end

-- The un-inverted message must be a well-formed Binding message whose attributes
-- exactly fill its length. Cheap checks first: this runs on every UDP datagram.
local function is_inverted_stun(tvb)
    local len = tvb:len()
    if len < 20 or len > 1500 or (len - 20) % 4 ~= 0 then return false end
    local mtype = 0xffff - tvb(0, 2):uint()
    if not STUN_TYPES[mtype] then return false end
    if 0xffff - tvb(2, 2):uint() ~= len - 20 then return false end
    local off = 20
    while off < len do
        if off + 4 > len then return false end
        local alen = 0xffff - tvb(off + 2, 2):uint()
        off = off + 4 + alen + ((4 - alen % 4) % 4)
    end
    return off == len
end

local function dissect_punch(tvb, pinfo, tree)
    local len = tvb:len()
    local plain = ByteArray.new(invert(tvb:raw()), true):tvb("Un-inverted STUN")
    local subtree = tree:add(dhpunch, tvb())
    local mtype = plain(0, 2):uint()
    subtree:add(punch_f.msg_type, tvb(0, 2), mtype)
    local cookie = plain(4, 4):uint()
    subtree:add(punch_f.cookie, tvb(4, 4), cookie)
    subtree:add(punch_f.tid, tvb(8, 12), plain(8, 12):raw())
    local off = 20
    while off + 4 <= len do
        local atype, alen = plain(off, 2):uint(), plain(off + 2, 2):uint()
        if off + 4 + alen > len then break end
        if (atype == 0x802A or atype == 0x8029) and alen == 8 then
            subtree:add(punch_f.identify, tvb(off + 4, 8), plain(off + 4, 8):raw())
        elseif atype == 0x0004 and alen == 8 then
            subtree:add(punch_f.port, tvb(off + 6, 2), plain(off + 6, 2):uint())
            subtree:add(punch_f.ip, tvb(off + 8, 4), plain(off + 8, 4):ipv4())
        end
        off = off + 4 + alen + ((4 - alen % 4) % 4)
    end
    -- Devices pick a random cookie, which makes it RFC 3489 ("classic") STUN.
    local stun = classicstun_dissector
    if cookie == STUN_MAGIC_COOKIE or not stun then stun = stun_dissector end
    if stun then call_sub(stun, plain, pinfo, tree) end
    pinfo.cols.protocol:set("DH-PUNCH")
    set_info(pinfo, "DH-P2P hole punch: inverted STUN " .. (STUN_TYPES[mtype] or "message"))
    return len
end

------------------------------------------------------------------------------------
-- PTCP (PROTOCOLS 2.5)
------------------------------------------------------------------------------------

local ptcp = Proto("ptcp", "Dahua PTCP tunnel")

-- Body types. An empty body (acknowledgement) has no type byte: the ptcp.type field
-- then carries the pseudo value TYPE_ACK so that "ptcp.type == 0x100" finds acks.
local TYPE_ACK = 0x100
local TYPE_SYN, TYPE_DATA, TYPE_BIND, TYPE_STATUS, TYPE_HEARTBEAT = 0x00, 0x10, 0x11, 0x12, 0x13
-- PROTOCOLS 2.5, 2.7 (b): the device's retransmission request. Out of band: its body is
-- not counted in the sender's stream (its next data packet carries the same sent).
local TYPE_RESEND = 0x0a
local TYPE_NAMES = {
    [TYPE_ACK] = "ack",
    [TYPE_SYN] = "SYN",
    [TYPE_DATA] = "data",
    [TYPE_BIND] = "bind",
    [TYPE_STATUS] = "status",
    [TYPE_HEARTBEAT] = "heartbeat",
    [TYPE_RESEND] = "retransmission request",
    [0x17] = "sign exchange: request",
    [0x18] = "sign exchange: unknown",
    [0x19] = "sign exchange: sign",
    [0x1a] = "sign exchange: reply",
    [0x1b] = "sign exchange: confirm",
}
local SIGN_TYPES = { [0x17] = true, [0x18] = true, [0x19] = true, [0x1a] = true, [0x1b] = true }
local STATUS_NAMES = { CONN = "connected", DISC = "closed" }
local HEADER_LEN = 24
local SYN_BODY = 0x00030100

local f = {
    magic = ProtoField.string("ptcp.magic", "Magic"),
    sent = ProtoField.uint32("ptcp.sent", "Sent (body bytes before this packet)", base.DEC),
    recv = ProtoField.uint32("ptcp.recv", "Received (body bytes acknowledged)", base.DEC),
    pid = ProtoField.uint32("ptcp.pid", "Packet id", base.HEX),
    lmid = ProtoField.uint32("ptcp.lmid", "Local message id", base.DEC),
    rmid = ProtoField.uint32("ptcp.rmid", "Remote message id (last received)", base.DEC),
    body = ProtoField.bytes("ptcp.body", "Body"),
    ptype = ProtoField.uint16("ptcp.type", "Type", base.HEX, TYPE_NAMES),
    length = ProtoField.uint24("ptcp.length", "Length", base.DEC),
    syn = ProtoField.uint24("ptcp.syn", "SYN value", base.HEX),
    realm = ProtoField.uint32("ptcp.realm", "Realm", base.HEX),
    reserved = ProtoField.uint32("ptcp.reserved", "Reserved", base.HEX),
    resend = ProtoField.bytes("ptcp.resend", "Retransmission request fields (layout not settled)"),
    bind_port = ProtoField.uint32("ptcp.bind.port", "Bind port", base.DEC),
    bind_ip = ProtoField.ipv4("ptcp.bind.ip", "Bind IPv4 address"),
    status = ProtoField.string("ptcp.status", "Status"),
    data = ProtoField.bytes("ptcp.data", "Data"),
    sign = ProtoField.bytes("ptcp.sign", "Sign"),
    realm_port = ProtoField.uint32("ptcp.realm.port", "Realm bound to port", base.DEC),
    realm_bind = ProtoField.framenum("ptcp.realm.bind_frame", "Realm bound in frame"),
    reassembled = ProtoField.framenum("ptcp.reassembled_in", "Continued, reassembled in frame"),
    retransmission = ProtoField.bool("ptcp.retransmission", "Retransmission"),
    held_in = ProtoField.framenum("ptcp.ooo.dissected_in", "Out of order: dissected in frame"),
    held_from = ProtoField.framenum("ptcp.ooo.body_of", "Held body of frame, in order now"),
    batch_count = ProtoField.uint16("ptcp.batch.count", "PTCP packets in this datagram (GSO batch)",
        base.DEC),
    batch_index = ProtoField.uint16("ptcp.batch.index", "Packet number in the GSO batch", base.DEC),
    batch_segment = ProtoField.uint16("ptcp.batch.segment_size", "GSO segment size", base.DEC),
}
ptcp.fields = {
    f.magic, f.sent, f.recv, f.pid, f.lmid, f.rmid, f.body, f.ptype, f.length, f.syn, f.realm,
    f.reserved, f.resend, f.bind_port, f.bind_ip, f.status, f.data, f.sign, f.realm_port,
    f.realm_bind, f.reassembled, f.retransmission, f.held_in, f.held_from, f.batch_count, f.batch_index,
    f.batch_segment,
}

local e = {
    short = ProtoExpert.new("ptcp.short", "Packet shorter than the 24-byte PTCP header",
        expert.group.PROTOCOL, expert.severity.ERROR),
    short_body = ProtoExpert.new("ptcp.short_body", "Body too short for its type",
        expert.group.PROTOCOL, expert.severity.ERROR),
    bad_length = ProtoExpert.new("ptcp.bad_length", "Data length field disagrees with the data",
        expert.group.PROTOCOL, expert.severity.ERROR),
    bad_syn = ProtoExpert.new("ptcp.bad_syn", "SYN body is not 00 03 01 00",
        expert.group.PROTOCOL, expert.severity.WARN),
    unknown_type = ProtoExpert.new("ptcp.unknown_type", "Unknown body type",
        expert.group.UNDECODED, expert.severity.WARN),
    unknown_realm = ProtoExpert.new("ptcp.unknown_realm",
        "Realm not bound in this capture: shown as raw data",
        expert.group.SEQUENCE, expert.severity.NOTE),
    retransmitted = ProtoExpert.new("ptcp.retransmitted",
        "Body bytes already sent by an earlier packet (retransmission)",
        expert.group.SEQUENCE, expert.severity.NOTE),
    gap = ProtoExpert.new("ptcp.gap", "Body bytes missing before this packet (not captured)",
        expert.group.SEQUENCE, expert.severity.WARN),
    out_of_order = ProtoExpert.new("ptcp.out_of_order",
        "Out of order: body bytes missing before this packet",
        expert.group.SEQUENCE, expert.severity.NOTE),
}
ptcp.experts = {
    e.short, e.short_body, e.bad_length, e.bad_syn, e.unknown_type, e.unknown_realm,
    e.retransmitted, e.gap, e.out_of_order,
}

-- State learnt on the first pass, in capture order. A packet is named by its packet key
-- "frame.index" (index 1 unless the datagram is a GSO batch of several packets), so
-- two packets of one frame never share state:
--   binds[conv][realm] = { port = n, frame = n }   (from bind packets)
--   streams[conv|realm|sender|gen] = { parts = {bytes...}, plen = n, need = n,
--                                      waiting = {slots} }
--   frames[slot] = what was decided for one piece of realm data (reused on later
--                  passes); slot = "key:0" for a packet's own data, "key:aN" and
--                  "key:bN" for held bodies dissected with that packet
--   senders[conv|sender] = { next = sent value expected next, gen = n, held = {} }
--   seqs[packet key] = { in_order, retrans, held, gap, gen, before, after }
local binds, streams, frames, senders, seqs = {}, {}, {}, {}, {}

ptcp.prefs.realm_ports = Pref.string("Realm port dissectors", DEFAULT_REALM_PORTS,
    "Comma-separated PORT=dissector pairs: data of a realm bound to PORT is handed to " ..
    "that dissector (e.g. rtsp, http); realms bound to other ports show as raw data")

function ptcp.prefs_changed()
    PORT_DISSECTORS = parse_realm_ports(ptcp.prefs.realm_ports)
end

function ptcp.init()
    binds, streams, frames, senders, seqs = {}, {}, {}, {}, {}
end

-- (a - b) modulo 2^32 as a signed number: PROTOCOLS 2.5, sent/recv wrap.
local function diff32(a, b)
    local d = (a - b) % 4294967296
    if d >= 2147483648 then d = d - 4294967296 end
    return d
end

local function endpoint(addr, port)
    return tostring(addr) .. ":" .. tostring(port)
end

local function conversation_key(pinfo)
    local a, b = endpoint(pinfo.src, pinfo.src_port), endpoint(pinfo.dst, pinfo.dst_port)
    if a > b then a, b = b, a end
    return a .. "|" .. b
end

local function hex32(n)
    return string.format("0x%08x", n)
end

-- Bodies held back waiting for missing bytes: at most this many per sender, for at most
-- this long (capture time). The emulated device resends lost data within milliseconds;
-- a real device never resends, so after this the stream resumes past the hole.
local HOLD_PACKETS = 256
local HOLD_SECONDS = 1.0
local MOD32 = 4294967296

-- Move held bodies that now continue the stream from `st.held` to `list`, and drop
-- held bodies that a resend with other boundaries has overtaken.
local function drain(st, list, number)
    while true do
        local h = st.held[st.next]
        if not h then break end
        st.held[st.next] = nil
        st.nheld = st.nheld - 1
        h.seq.drained_in = number
        list[#list + 1] = h
        st.next = (st.next + #h.body) % MOD32
    end
    for offset, h in pairs(st.held) do
        if diff32(offset, st.next) < 0 then
            st.held[offset] = nil
            st.nheld = st.nheld - 1
            h.seq.superseded = true
        end
    end
end

-- Place a packet in its sender's body byte stream by its sent counter (first pass only;
-- the result is kept per frame). In order: dissected now, followed by any held bodies
-- it makes contiguous (seq.after). Ahead of the stream (bytes missing before it): held
-- until the missing bytes come (seq.held), then dissected in that later frame. Behind
-- the stream: a retransmission, never dissected twice (seq.retrans). When held bodies
-- wait too long, the stream resumes at the earliest of them past a gap (seq.gap), a
-- new generation in which partial realm messages start afresh; those bodies are then
-- dissected before this packet's own (seq.before).
local function track_sequence(tvb, pinfo, conv, pkey)
    local number = pinfo.number
    local d = seqs[pkey]
    if d then return d end
    local key = conv .. "|" .. endpoint(pinfo.src, pinfo.src_port)
    local blen = tvb:len() - HEADER_LEN
    local sent = tvb(4, 4):uint()
    local now = pinfo.abs_ts
    local st = senders[key]
    d = { gen = 0, before = {}, after = {} }
    seqs[pkey] = d
    local function restart(gen)
        st = { next = (sent + blen) % MOD32, gen = gen, held = {}, nheld = 0, since = now }
        senders[key] = st
        d.gen, d.in_order = gen, true
        return d
    end
    if blen >= 1 and tvb(HEADER_LEN, 1):uint() == TYPE_SYN then
        -- A new session from this sender starts its counters again.
        return restart(st and st.gen + 1 or 0)
    end
    if not st then return restart(0) end
    d.gen = st.gen
    if blen == 0 then return d end
    if tvb(HEADER_LEN, 1):uint() == TYPE_RESEND then
        d.out_of_band = true -- not in the stream: no retransmission, no hole
        return d
    end
    local ahead = diff32(sent, st.next)
    if ahead > 0 and st.nheld > 0
        and (st.nheld >= HOLD_PACKETS or now - st.since > HOLD_SECONDS) then
        -- The missing bytes never came: resume at the earliest body held or this one.
        local first = sent
        for offset in pairs(st.held) do
            if diff32(offset, first) < 0 then first = offset end
        end
        d.gap = diff32(first, st.next)
        st.gen = st.gen + 1
        d.gen = st.gen
        st.next = first
        drain(st, d.before, number)
        ahead = diff32(sent, st.next)
    end
    if ahead < 0 then
        d.retrans = true
    elseif ahead > 0 then
        if st.nheld == 0 then st.since = now end
        if not st.held[sent] then st.nheld = st.nheld + 1 end
        st.held[sent] = { number = number, body = tvb:raw(HEADER_LEN), seq = d }
        d.held = ahead
    else
        d.in_order = true
        st.next = (sent + blen) % MOD32
        drain(st, d.after, number)
    end
    return d
end

-- Hand realm data to `sub`, joining it with the bytes an earlier packet left over
-- when the sub-dissector asked for more (an RTSP reply or an interleaved RTP frame
-- split over several PTCP packets). `decided` is the record of this piece of data
-- (frames[slot]): filled on the first pass, replayed on later ones.
-- Returns true when the data was handed over (and whether its tail waits for more),
-- false when it is only a continuation and waits for more.
local function dissect_realm_stream(data_tvb, pinfo, tree, sub, stream_key, subtree, decided)
    local number = pinfo.number
    if decided.prefix == nil and not decided.wait then
        local st = streams[stream_key]
        if not st then
            st = { parts = {}, plen = 0, need = 0, waiting = {} }
            streams[stream_key] = st
        end
        -- The pieces wait in a list, joined once: a message over many packets (a
        -- key frame over a whole GSO batch) costs linear, not quadratic, copying.
        local chunk = data_tvb:raw()
        if st.need > 0 and st.plen + #chunk < st.need then
            st.parts[#st.parts + 1] = chunk
            st.plen = st.plen + #chunk
            decided.wait = true
            st.waiting[#st.waiting + 1] = decided
        else
            decided.prefix = table.concat(st.parts)
            for _, w in ipairs(st.waiting) do w.reassembled_in = number end
            st.waiting = {}
            st.parts, st.plen, st.need = {}, 0, 0
            decided.stream = st
        end
    end
    if decided.wait then
        if decided.reassembled_in then
            subtree:add(f.reassembled, decided.reassembled_in):set_generated()
        end
        return false
    end
    local whole = data_tvb
    if decided.prefix ~= "" then
        whole = ByteArray.new(decided.prefix .. data_tvb:raw(), true):tvb("Reassembled realm data")
    end
    local saved_can_desegment = pinfo.can_desegment
    pinfo.desegment_len = 0
    pinfo.desegment_offset = 0
    -- Two: the call through Dissector:call() takes one off, as for TCP payloads.
    pinfo.can_desegment = 2
    local ok = call_sub(sub, whole, pinfo, tree)
    local want_len, want_offset = pinfo.desegment_len, pinfo.desegment_offset
    pinfo.can_desegment = saved_can_desegment
    pinfo.desegment_len = 0
    pinfo.desegment_offset = 0
    if not ok then
        -- The sub-dissector threw (e.g. truncated data): show what we have as raw data.
        decided.stream = nil
        if data_dissector then call_sub(data_dissector, data_tvb, pinfo, tree) end
        return true
    end
    local st = decided.stream
    if st and want_len > 0 and want_offset < whole:len() then
        local rest = whole:raw(want_offset)
        st.parts, st.plen = { rest }, #rest
        if want_len == DESEGMENT_ONE_MORE_SEGMENT then
            st.need = #rest + 1
        else
            st.need = #rest + want_len
        end
        decided.partial = true
        st.waiting[#st.waiting + 1] = decided
    end
    decided.stream = nil
    if decided.partial and decided.reassembled_in then
        subtree:add(f.reassembled, decided.reassembled_in):set_generated()
    end
    return true, decided.partial
end

-- Realm data of one body: shown under `parent`, handed to the dissector of the port the
-- realm was bound to (learnt from bind packets on the first pass), else raw data.
-- Returns true when a sub-dissector got it, and whether a tail waits for more.
local function dissect_realm_data(data_tvb, realm, pinfo, tree, parent, gen, slot, dissect)
    local conv = conversation_key(pinfo)
    local decided = frames[slot]
    if not decided then
        decided = { bound = binds[conv] and binds[conv][realm] }
        frames[slot] = decided
    end
    local bound = decided.bound
    local sub
    if bound then
        parent:add(f.realm_port, bound.port):set_generated()
        parent:add(f.realm_bind, bound.frame):set_generated()
        sub = PORT_DISSECTORS[bound.port]
    else
        parent:add_proto_expert_info(e.unknown_realm)
    end
    if not dissect or not sub then
        if data_dissector then call_sub(data_dissector, data_tvb, pinfo, tree) end
        return false
    end
    local key = conv .. "|" .. hex32(realm) .. "|" .. endpoint(pinfo.src, pinfo.src_port) ..
        "|" .. tostring(gen)
    local handed, partial = dissect_realm_stream(data_tvb, pinfo, tree, sub, key, parent,
        decided)
    return handed, (not handed) or partial
end

-- A held body from an earlier frame, dissected in the frame that made it contiguous.
local function dissect_held_body(h, pinfo, tree, subtree, gen, slot)
    local body = h.body
    local item = subtree:add(f.held_from, h.number)
    item:set_generated()
    if #body <= 12 or body:byte(1) ~= TYPE_DATA then return end
    local declared = body:byte(2) * 65536 + body:byte(3) * 256 + body:byte(4)
    if declared ~= #body - 12 then return end
    local realm = ((body:byte(5) * 256 + body:byte(6)) * 256 + body:byte(7)) * 256 + body:byte(8)
    local data_tvb = ByteArray.new(body:sub(13), true):tvb(
        string.format("Realm data of frame %d", h.number))
    item:append_text(string.format(", data realm %s %d bytes", hex32(realm), declared))
    dissect_realm_data(data_tvb, realm, pinfo, tree, item, gen, slot, true)
end

local function add_realm(body_tree, tvb, off)
    local realm = tvb(off, 4):uint()
    body_tree:add(f.realm, tvb(off, 4))
    body_tree:add(f.reserved, tvb(off + 4, 4))
    return realm
end

-- Returns the Info sentence for the body at `off` (the body is the rest of `tvb`).
-- `pkey` names the packet in the state tables.
local function dissect_body(tvb, pinfo, tree, subtree, off, seq, pkey)
    local blen = tvb:len() - off
    if blen == 0 then
        subtree:add(f.ptype, TYPE_ACK):set_generated()
        return string.format("PTCP ack sent %d recv %d", tvb(4, 4):uint(), tvb(8, 4):uint())
    end
    local body_tree = subtree:add(f.body, tvb(off))
    if tvb(off, 1):uint() == TYPE_RESEND then
        -- any length and layout (one sample: 0a 00 08 53 00000000 003a00)
        body_tree:add(f.ptype, tvb(off, 1), TYPE_RESEND)
        body_tree:set_text("Body: retransmission request")
        if blen > 1 then body_tree:add(f.resend, tvb(off + 1, blen - 1)) end
        return string.format("PTCP retransmission request from offset %d (%d bytes, "
            .. "not counted in the stream)", tvb(8, 4):uint(), blen)
    end
    if blen < 4 then
        body_tree:add_proto_expert_info(e.short_body, string.format(
            "Body of %d bytes is shorter than its 4-byte type and length", blen))
        return string.format("PTCP malformed: body of %d bytes", blen)
    end
    local btype = tvb(off, 1):uint()
    local name = TYPE_NAMES[btype]
    body_tree:add(f.ptype, tvb(off, 1), btype)
    body_tree:set_text("Body: " .. (name or string.format("type 0x%02x", btype)))

    local function need(n)
        if blen >= n then return true end
        body_tree:add_proto_expert_info(e.short_body, string.format(
            "%s body of %d bytes, at least %d expected", name or "PTCP", blen, n))
        return false
    end

    if btype == TYPE_SYN then
        body_tree:add(f.syn, tvb(off + 1, 3))
        if tvb(off, 4):uint() ~= SYN_BODY or blen ~= 4 then
            body_tree:add_proto_expert_info(e.bad_syn)
        end
        return "PTCP SYN"
    end
    body_tree:add(f.length, tvb(off + 1, 3))
    if btype == TYPE_DATA then
        if not need(12) then return "PTCP malformed: data body too short" end
        local realm = add_realm(body_tree, tvb, off + 4)
        local data_len = blen - 12
        local declared = tvb(off + 1, 3):uint()
        local info = string.format("PTCP data realm %s %d bytes", hex32(realm), data_len)
        if declared ~= data_len then
            body_tree:add_proto_expert_info(e.bad_length, string.format(
                "Length field says %d bytes but %d follow", declared, data_len))
            info = string.format("PTCP malformed: data realm %s says %d bytes, has %d",
                hex32(realm), declared, data_len)
        end
        if data_len == 0 then return info end
        local data_tvb = tvb(off + 12, data_len):tvb()
        body_tree:add(f.data, tvb(off + 12, data_len))
        if seq.retrans then
            info = info .. " (retransmission)"
        elseif seq.held then
            info = info .. " (out of order)"
        end
        local dissect = seq.in_order and declared == data_len
        local _, waits = dissect_realm_data(data_tvb, realm, pinfo, tree, body_tree, seq.gen,
            pkey .. ":0", dissect)
        if waits then info = info .. " (continued in a later packet)" end
        return info
    elseif btype == TYPE_BIND then
        if not need(20) then return "PTCP malformed: bind body too short" end
        local realm = add_realm(body_tree, tvb, off + 4)
        local port = tvb(off + 12, 4):uint()
        body_tree:add(f.bind_port, tvb(off + 12, 4))
        body_tree:add(f.bind_ip, tvb(off + 16, 4))
        if not pinfo.visited then
            local conv = conversation_key(pinfo)
            binds[conv] = binds[conv] or {}
            binds[conv][realm] = { port = port, frame = pinfo.number }
        end
        return string.format("PTCP bind realm %s to %s:%d", hex32(realm),
            tostring(tvb(off + 16, 4):ipv4()), port)
    elseif btype == TYPE_STATUS then
        if not need(16) then return "PTCP malformed: status body too short" end
        local realm = add_realm(body_tree, tvb, off + 4)
        local status = printable(tvb(off + 12, 4):raw())
        body_tree:add(f.status, tvb(off + 12, 4))
        local meaning = STATUS_NAMES[status]
        return string.format("PTCP status realm %s %s%s", hex32(realm), status,
            meaning and (" (" .. meaning .. ")") or "")
    elseif btype == TYPE_HEARTBEAT then
        return "PTCP heartbeat"
    elseif SIGN_TYPES[btype] then
        if blen > 12 then body_tree:add(f.sign, tvb(off + 12, blen - 12)) end
        return string.format("PTCP %s (0x%02x)", name, btype)
    end
    body_tree:add_proto_expert_info(e.unknown_type, string.format("Unknown body type 0x%02x",
        btype))
    return string.format("PTCP unknown body type 0x%02x, %d bytes", btype, blen)
end

-- Body kinds counted in the Info column of a GSO batch.
local function body_kind(tvb)
    local blen = tvb:len() - HEADER_LEN
    if blen == 0 then return "ack" end
    if blen < 4 then return "malformed" end
    return TYPE_NAMES[tvb(HEADER_LEN, 1):uint()] or "unknown"
end

-- PROTOCOLS 2.5 has one PTCP packet per datagram, but a capture on a host that sends
-- with UDP GSO (ptcp.py does, udp(7) UDP_SEGMENT) shows a run of datagrams to one peer
-- as one datagram: packets of one size back to back, the last one possibly shorter.
local GSO_MAX_SEGMENTS = 64
local GSO_MAX_BYTES = 65507

-- The segment size when payload `s` (starting with "PTCP") is a batch of several
-- packets, else nil. Cheap: only offsets k where "PTCP" occurs are tried, each try
-- looks at most at len/k places and stops at the first one without the magic.
local function batch_segment_size(s)
    local len = #s
    if len < 2 * HEADER_LEN or len > GSO_MAX_BYTES then return nil end
    local function fits(k)
        if k < HEADER_LEN or k >= len then return false end
        local count = math.floor((len + k - 1) / k)
        -- The last segment is 1..k bytes; it must hold a header.
        if count > GSO_MAX_SEGMENTS or len - (count - 1) * k < HEADER_LEN then return false end
        for off = k, len - 1, k do
            if s:sub(off + 1, off + 4) ~= "PTCP" then return false end
        end
        return true
    end
    if s:sub(HEADER_LEN + 1, HEADER_LEN + 4) == "PTCP" then
        -- An ack (empty body) followed by another packet: all but the last are acks.
        return fits(HEADER_LEN) and HEADER_LEN or nil
    end
    if s:byte(HEADER_LEN + 1) == TYPE_DATA and len >= HEADER_LEN + 12 then
        local k = HEADER_LEN + 12 + ((s:byte(HEADER_LEN + 2) * 256 + s:byte(HEADER_LEN + 3)) * 256
            + s:byte(HEADER_LEN + 4))
        return fits(k) and k or nil
    end
    local at = s:find("PTCP", HEADER_LEN + 1, true)
    while at and at - 1 <= len - HEADER_LEN do
        if fits(at - 1) then return at - 1 end
        at = s:find("PTCP", at + 1, true)
    end
    return nil
end

-- One PTCP packet (the whole datagram, or one packet of a GSO batch): its subtree,
-- sequence tracking, body and held bodies it releases. `pkey` names it in the state
-- tables; `batch` = { index, count, size } for a packet of a batch. Sub-dissector Info
-- texts accumulate (fenced) in the Info column. Returns its Info sentence and sequence
-- record.
local function dissect_packet(tvb, pinfo, tree, pkey, batch)
    local subtree = tree:add(ptcp, tvb())
    if batch then
        subtree:add(f.batch_index, batch.index):set_generated()
        subtree:add(f.batch_count, batch.count):set_generated()
        subtree:add(f.batch_segment, batch.size):set_generated()
    end
    subtree:add(f.magic, tvb(0, 4))
    subtree:add(f.sent, tvb(4, 4))
    subtree:add(f.recv, tvb(8, 4))
    subtree:add(f.pid, tvb(12, 4))
    subtree:add(f.lmid, tvb(16, 4))
    subtree:add(f.rmid, tvb(20, 4))
    local seq = track_sequence(tvb, pinfo, conversation_key(pinfo), pkey)
    if seq.retrans then
        subtree:add(f.retransmission, true):set_generated()
        subtree:add_proto_expert_info(e.retransmitted)
    end
    if seq.gap then
        subtree:add_proto_expert_info(e.gap, string.format(
            "%d body bytes missing before this packet (not captured)", seq.gap))
    end
    if seq.held then
        subtree:add_proto_expert_info(e.out_of_order, string.format(
            "Out of order: %d body bytes missing before this packet", seq.held))
        if seq.drained_in then
            subtree:add(f.held_in, seq.drained_in):set_generated()
        end
    end
    local function held_bodies(list, tag)
        for i, h in ipairs(list) do
            separate_sub_info(pinfo)
            dissect_held_body(h, pinfo, tree, subtree, seq.gen, pkey .. tag .. i)
        end
    end
    held_bodies(seq.before, ":b")
    -- Realm data handed to RTSP or HTTP leaves their name in the Protocol column.
    separate_sub_info(pinfo)
    local info = dissect_body(tvb, pinfo, tree, subtree, HEADER_LEN, seq, pkey)
    held_bodies(seq.after, ":a")
    local held = #seq.before + #seq.after
    if held > 0 then
        info = info .. string.format(" (+%d held bod%s)", held, held == 1 and "y" or "ies")
    end
    subtree:append_text(", " .. info:gsub("^PTCP ", ""))
    if batch then
        subtree:append_text(string.format(" [batch packet %d/%d]", batch.index, batch.count))
    end
    return info, seq
end

-- Info of a batch: the first packet's sentence and a tally of the others, e.g.
-- "PTCP x49 (GSO batch): data realm 0x1a2b3c4d 1280 bytes, +48 more: 47 data
-- (60160 bytes), 1 status".
local function batch_info(first_info, packets)
    local order, counts, data_bytes = {}, {}, 0
    local retrans, held = 0, 0
    for i = 2, #packets do
        local p = packets[i]
        if not counts[p.kind] then
            order[#order + 1] = p.kind
            counts[p.kind] = 0
        end
        counts[p.kind] = counts[p.kind] + 1
        if p.kind == "data" then data_bytes = data_bytes + p.len - HEADER_LEN - 12 end
        if p.seq.retrans then retrans = retrans + 1 end
        if p.seq.held then held = held + 1 end
    end
    local parts = {}
    for _, kind in ipairs(order) do
        local part = string.format("%d %s", counts[kind], kind)
        if kind == "data" then part = part .. string.format(" (%d bytes)", data_bytes) end
        parts[#parts + 1] = part
    end
    if retrans > 0 then parts[#parts + 1] = string.format("%d retransmitted", retrans) end
    if held > 0 then parts[#parts + 1] = string.format("%d out of order", held) end
    return string.format("PTCP x%d (GSO batch): %s, +%d more: %s", #packets,
        first_info:gsub("^PTCP ", ""), #packets - 1, table.concat(parts, ", "))
end

local function dissect_ptcp(tvb, pinfo, tree)
    local len = tvb:len()
    pinfo.cols.protocol:set("PTCP")
    if len < HEADER_LEN then
        local subtree = tree:add(ptcp, tvb())
        subtree:add(f.magic, tvb(0, 4))
        subtree:add_proto_expert_info(e.short, string.format(
            "Only %d of the 24 header bytes", len))
        set_info(pinfo, string.format("PTCP malformed: header truncated (%d of %d bytes)",
            len, HEADER_LEN))
        return len
    end
    -- Sub-dissectors fill the Info column; what they write follows our sentence.
    pinfo.cols.info:clear_fence()
    pinfo.cols.info:clear()
    fenced_info = ""
    local info
    local size = batch_segment_size(tvb:raw())
    if not size then
        info = dissect_packet(tvb, pinfo, tree, pinfo.number .. ".1")
    else
        local count = math.floor((len + size - 1) / size)
        local packets = {}
        for i = 1, count do
            local off = (i - 1) * size
            local plen = math.min(size, len - off)
            local ptvb = tvb(off, plen):tvb()
            local batch = { index = i, count = count, size = size }
            local pinfo_text, seq = dissect_packet(ptvb, pinfo, tree, pinfo.number .. "." .. i,
                batch)
            packets[i] = { kind = body_kind(ptvb), len = plen, seq = seq }
            if i == 1 then info = pinfo_text end
        end
        info = batch_info(info, packets)
    end
    local sub_text = sub_info(pinfo)
    set_info(pinfo, sub_text and (info .. ": " .. sub_text) or info)
    return len
end

------------------------------------------------------------------------------------
-- Registration: heuristics must reject foreign datagrams quickly.
------------------------------------------------------------------------------------

local function heur_ptcp(tvb, pinfo, tree)
    if tvb:len() < 4 or tvb(0, 4):raw() ~= "PTCP" then return false end
    dissect_ptcp(tvb, pinfo, tree)
    return true
end

local function heur_signalling(tvb, pinfo, tree)
    local len = tvb:len()
    if len < 12 then return false end
    local c = tvb(0, 1):uint()
    -- 'D' (DHGET/DHPOST), 'N' (NFGET/NFPOST), 'H' (HTTP/1.x), 'S' (Server Nat Info!)
    if c ~= 0x44 and c ~= 0x4E and c ~= 0x48 and c ~= 0x53 then return false end
    if not is_signalling(tvb(0, math.min(len, 16)):raw(), tvb) then return false end
    dissect_signalling(tvb, pinfo, tree)
    return true
end

local function heur_punch(tvb, pinfo, tree)
    if not is_inverted_stun(tvb) then return false end
    dissect_punch(tvb, pinfo, tree)
    return true
end

ptcp:register_heuristic("udp", heur_ptcp)
dhp2p:register_heuristic("udp", heur_signalling)
dhpunch:register_heuristic("udp", heur_punch)
