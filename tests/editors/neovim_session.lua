-- A typing session in headless Neovim against `vqt lsp`, driven by tests/test_lsp.py.
-- Environment: VQT_NVIM_CMD (the server command, JSON list), VQT_NVIM_FILE (the buffer's file name),
-- VQT_NVIM_OUT (where the results go, JSON). Works with Neovim 0.7 (start_client) and later (vim.lsp.start).
local out_path = os.getenv("VQT_NVIM_OUT")
local result = { diagnostics = {} }

local function wait(what, ms, predicate)
  if not vim.wait(ms, predicate, 20) then
    error("timed out waiting for " .. what)
  end
end

local function session()
  local cmd = vim.fn.json_decode(os.getenv("VQT_NVIM_CMD"))
  local file = os.getenv("VQT_NVIM_FILE")
  vim.cmd("edit " .. vim.fn.fnameescape(file))
  local buf = vim.api.nvim_get_current_buf()
  local config = {
    name = "vqt",
    cmd = cmd,
    root_dir = vim.fn.fnamemodify(file, ":h"),
    handlers = {
      ["textDocument/publishDiagnostics"] = function(_, params)
        table.insert(result.diagnostics, params)
      end,
    },
  }
  local client_id
  if vim.lsp.start then
    client_id = vim.lsp.start(config)
  else
    client_id = vim.lsp.start_client(config)
    vim.lsp.buf_attach_client(buf, client_id)
  end
  wait("initialize", 120000, function()
    local client = vim.lsp.get_client_by_id(client_id)
    return client ~= nil and client.initialized
  end)

  -- Type, as a user would (emoji entered by code point: <C-v>U), then edit in the middle of a line
  -- with non-ASCII text before it.
  local function type(keys)
    vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(keys, true, false, true), "xt", false)
  end
  type("iCafé owners in Zürich <C-v>U0001F600 met<CR>The <C-v>U0001F980 crab walked away<Esc>")
  vim.api.nvim_win_set_cursor(0, { 1, 0 })
  type("3wdw")
  type("A and left<Esc>")

  local version = vim.lsp.util.buf_versions[buf]
  wait("the diagnostics of version " .. version, 60000, function()
    local last = result.diagnostics[#result.diagnostics]
    return last ~= nil and last.version == version
  end)
  result.version = version
  result.buffer = table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n") .. "\n"

  vim.api.nvim_win_set_cursor(0, { 2, 10 }) -- line 2, after "The 🦀 c" (byte column 10)
  result.cursor = vim.lsp.util.make_position_params()
  local function ask(method, params)
    local answers, err = vim.lsp.buf_request_sync(buf, method, params, 60000)
    if not answers or not answers[client_id] then
      error(method .. " got no answer: " .. tostring(err))
    end
    return answers[client_id]
  end
  result.hover = ask("textDocument/hover", result.cursor)
  result.completion = ask("textDocument/completion", result.cursor)
  result.inspect = ask("workspace/executeCommand",
    { command = "vqt.inspect", arguments = { vim.uri_from_bufnr(buf), true } })
  vim.lsp.stop_client(client_id)
  wait("the server to stop", 30000, function() return vim.lsp.get_client_by_id(client_id) == nil end)
end

local ok, err = pcall(session)
if not ok then
  result.error = tostring(err)
end
vim.fn.writefile({ vim.fn.json_encode(result) }, out_path)
vim.cmd("qall!")
